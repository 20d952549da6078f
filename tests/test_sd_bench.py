"""`marble bench` on a tiny SD-shaped model: every number is produced, diffusers runs on the very
same tensors (its image and final latents agree with marble's), and bf16 stays close to fp32."""
import json
import math
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from marble.eval.sd_bench import BenchSettings, psnr, run_bench
from sd_fixtures import diffusers_oracle, tiny_sd

diffusers_oracle()


def test_bench_times_marble_and_diffusers_on_the_same_weights():
    settings = BenchSettings(size=64, steps=4, unet_calls=1, decodes=1)
    lines = []
    report = run_bench(settings, log=lines.append, config=tiny_sd("sd1"))
    for timing in (report.marble, report.diffusers, report.marble_bf16):
        assert timing.unet_step_s > 0 and timing.vae_decode_s > 0 and timing.image_s > 0 and timing.peak_rss_gb > 0
    assert set(report.ratios()) == {"unet_step_s", "vae_decode_s", "image_s"}
    assert report.latent_rel_diff_vs_diffusers < 1e-4          # same weights, same start, same math
    assert report.max_pixel_diff_vs_diffusers <= 1
    assert report.psnr_bf16_db >= 30
    data = json.loads(report.to_json())
    assert data["marble_over_diffusers"]["image_s"] == pytest.approx(report.marble.image_s / report.diffusers.image_s)
    assert "| U-Net step (batch 2) |" in report.markdown() and any("marble fp32" in line for line in lines)


def test_bench_with_approximations_times_them_beside_diffusers_and_measures_their_psnr():
    settings = BenchSettings(size=64, steps=4, unet_calls=0, decodes=0, approximations={"tome": 0.5, "deepcache": 2})
    report = run_bench(settings, log=[].append, config=tiny_sd("sd1"))
    for timing in (report.marble_approx, report.marble_bf16_approx):
        assert timing.image_s > 0 and timing.unet_step_s is None
    # the approximate images differ from the exact fp32 one, and the exact bf16 one is nearer to it
    assert math.isfinite(report.psnr_approx_db) and math.isfinite(report.psnr_bf16_approx_db)
    assert report.psnr_bf16_db > report.psnr_bf16_approx_db
    ratios = report.image_ratios()
    assert set(ratios) == {"fp32", "bf16", "fp32_approx", "bf16_approx"}
    assert ratios["fp32_approx"] == pytest.approx(report.marble_approx.image_s / report.diffusers.image_s)
    data = json.loads(report.to_json())
    assert data["settings"]["approximations"] == {"tome": 0.5, "deepcache": 2}
    assert data["psnr_approx_vs_fp32_db"] == report.psnr_approx_db
    text = report.markdown()
    assert "marble bf16 + ToMe 0.5 + DeepCache 2" in text
    assert f"bf16 + ToMe 0.5 + DeepCache 2 image vs fp32 image: PSNR {report.psnr_bf16_approx_db:.1f} dB" in text


def test_bench_with_int8_times_a_quantised_copy_and_leaves_the_bf16_row_without_it():
    settings = BenchSettings(size=64, steps=2, unet_calls=0, decodes=0, diffusers=False,
                             approximations={"tome": 0.5}, quantize="int8")
    report = run_bench(settings, log=[].append, config=tiny_sd("sd1"))
    assert report.marble_approx.image_s > 0 and report.marble_bf16_approx.image_s > 0
    assert math.isfinite(report.psnr_approx_db)
    text = report.markdown()
    assert "marble fp32 + ToMe 0.5 + int8" in text and "marble bf16 + ToMe 0.5 |" in text
    # int8 changes the fp32 row's image and nothing else: the exact rows and the bf16 row are as without it
    plain = run_bench(replace(settings, quantize=None), log=[].append, config=tiny_sd("sd1"))
    assert report.psnr_approx_db != plain.psnr_approx_db
    assert report.psnr_bf16_approx_db == plain.psnr_bf16_approx_db and report.psnr_bf16_db == plain.psnr_bf16_db


def test_psnr():
    import numpy as np
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert psnr(a, b) == math.inf
    b[0, 0, 0] = 255                   # MSE = 255² / 48
    assert psnr(a, b) == pytest.approx(10 * math.log10(48))


def test_bench_cli_refuses_bad_settings_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from marble.cli import app
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    for args in (["--size", "100"], ["--steps", "0"], ["--json", str(taken)], ["--tome", "0.9"], ["--tome", "0"],
                 ["--deepcache", "1"], ["--tome", "0.5", "--model", "builtin"], ["--deepcache", "2", "--arch", "sdxl"],
                 ["--quantize", "int4"], ["--quantize", "int8", "--model", "builtin"]):
        r = CliRunner().invoke(app, ["bench", *args])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert taken.read_text() == "{}"
