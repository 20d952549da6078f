"""`marble bench --arch sdxl` on a tiny SDXL config: both sides run, each in its own subprocess, on
the same weights (their U-Net outputs agree), and the table has its rows and columns."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marble.config import config_to_dict
from marble.eval.sdxl_bench import SdxlBenchSettings, run_sdxl_bench
from sd_fixtures import diffusers_oracle, tiny_sdxl

diffusers_oracle()


def test_sdxl_bench_runs_marble_and_diffusers_in_subprocesses_on_the_same_weights():
    settings = SdxlBenchSettings(size=64, weights="fp16", config=config_to_dict(tiny_sdxl()), threads=1)
    lines = []
    report = run_sdxl_bench(settings, log=lines.append)
    assert set(report.sides) == {"marble", "diffusers"}
    for side in report.sides.values():
        assert side.unet_step_s > 0 and side.vae_decode_s > 0 and side.peak_rss_gb > 0 and side.threads == 1
        # the peak is reset after the build: the generation's peak is that of its two phases
        assert side.peak_rss_gb == max(side.unet_peak_gb, side.decode_peak_gb) and side.build_peak_gb > 0
    marble, theirs = report.sides["marble"], report.sides["diffusers"]
    assert marble.weights_gb * 2 == theirs.weights_gb        # fp16 storage against float32
    assert marble.peak_rss_gb != theirs.peak_rss_gb           # two processes, two peaks
    assert report.unet_rel_diff < 1e-5                        # the same values, float32 arithmetic on both sides
    table = report.markdown().splitlines()
    assert table[2] == "| | marble (fp16 weights, fp32 compute) | diffusers fp32 |"
    assert [row.split(" | ")[0] for row in table[4:11]] == [
        "| U-Net step (CFG batch 2)", "| VAE decode 64²", "| weights (U-Net + VAE)", "| peak RSS, U-Net step",
        "| peak RSS, VAE decode", "| peak RSS / weights", "| peak RSS, build (before the reset)"]
    assert all(row.count("|") == 4 for row in table[2:11])
    assert set(report.ratios()) == {"unet_step_s", "vae_decode_s"}
    data = json.loads(report.to_json())
    assert data["sides"]["marble"]["unet_step_s"] == marble.unet_step_s and data["unet_rel_diff"] == report.unet_rel_diff
    assert data["sides"]["marble"]["decode_peak_gb"] == marble.decode_peak_gb
    assert sum("subprocess" in line for line in lines) == 2


def test_low_memory_side_maps_its_weights_and_computes_the_same_bits():
    """--low-memory: the weights go through a file and come back as views of its memory map, the
    VAE's pages released before the U-Net call and the U-Net's before the decode: the same U-Net
    output, bit for bit, and the table says which mode ran."""
    import numpy as np

    from marble.models.vae import AutoencoderKL
    base = SdxlBenchSettings(size=64, weights="fp16", config=config_to_dict(tiny_sdxl()), threads=1, warmup=False)
    low = SdxlBenchSettings(**{**base.__dict__, "low_memory": True})
    plain = run_sdxl_bench(base, log=lambda _: None, diffusers=False).sides["marble"]
    report = run_sdxl_bench(low, log=lambda _: None, diffusers=False)
    mapped = report.sides["marble"]
    assert np.array_equal(mapped.output, plain.output) and mapped.weights_gb == plain.weights_gb
    unet_gb = mapped.weights_gb - sum(2 * p.numel() for p in AutoencoderKL(tiny_sdxl().vae).parameters()) / 1e9
    assert plain.released_gb == 0 and unet_gb <= mapped.released_gb < unet_gb + 1e-4   # its pages, to a page each
    assert report.markdown().splitlines()[2] == "| | marble (fp16 weights, fp32 compute, --low-memory) |"
    assert json.loads(report.to_json())["settings"]["low_memory"] is True
    assert report.markdown().splitlines()[11].startswith("| released before the decode (--low-memory) |")


def test_bench_cli_refuses_a_bad_arch_or_weights_in_one_line():
    from typer.testing import CliRunner

    from marble.cli import app
    for args, message in ((["--arch", "sd3"], "--arch must be sd15 or sdxl"),
                          (["--arch", "sdxl", "--weights", "int8"], "--weights must be one of fp32, fp16, bf16"),
                          (["--arch", "sd15", "--low-memory"], "--low-memory is an option of --arch sdxl")):
        r = CliRunner().invoke(app, ["bench", *args])
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
