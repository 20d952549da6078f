"""Few-step settings at the edges: presets and spacings in a request, the card's warnings, the record,
and SD-Turbo checkpoints known by name. The samplers themselves are checked on the Gaussian-mixture
oracle (test_samplers.py) and the spacings against diffusers (test_schedule.py)."""
from dataclasses import replace
from pathlib import Path

import pytest

from marble.diffusion.few_step import PRESETS, FewStepSettings, few_step_warnings, get_preset
from marble.diffusion.schedule import spacing
from marble.hires import HiresFix
from marble.record import GenerationRecord
from marble.request import GenerationRequest, ModelDefaults, RequestError, resolve

pytestmark = pytest.mark.unit

DEFAULTS = ModelDefaults(steps=15, cfg=4.0, sampler="DPM++ 2M Karras", width=64, height=64, latent_factor=4,
                         max_pixels=512 * 512)
TURBO = PRESETS["sd-turbo"]


def res(defaults=DEFAULTS, **kw):
    return resolve(GenerationRequest(prompt="a red circle", seed=1, **kw), defaults)


def test_presets_fill_what_the_request_leaves_out():
    r = res(preset="sd-turbo")
    assert (r.sampler, r.spacing, r.steps, r.cfg, r.warnings) == ("Euler a", "trailing", 1, 1.0, ())
    r = res(preset="LCM_LoRA", steps=6, cfg=1.5)
    assert (r.sampler, r.spacing, r.steps, r.cfg, r.warnings) == ("LCM", "lcm", 6, 1.5, ())
    # without a preset: the model's defaults and the sampler's own spacing, no warnings
    r = res()
    assert (r.sampler, r.spacing, r.steps, r.cfg, r.warnings) == ("DPM++ 2M Karras", "karras", 15, 4.0, ())
    assert res(sampler="Euler").spacing == "normal" and res(sampler="Euler", spacing="Trailing").spacing == "trailing"
    assert resolve(r, DEFAULTS) == r                                    # resolving again changes nothing


def test_settings_outside_the_card_warn_and_name_it():
    r = res(preset="sd-turbo", steps=20, cfg=0.0)
    assert r.steps == 20 and r.cfg == 0.0                               # allowed: a warning, not an error
    assert len(r.warnings) == 2
    steps_line, cfg_line = r.warnings
    assert steps_line.startswith("20 steps is outside") and "SD-Turbo model card" in steps_line
    assert "sampler Euler a, trailing spacing, 1-4 steps, CFG 1" in steps_line
    assert cfg_line.startswith("CFG 0 is outside") and "guidance off is CFG 1" in cfg_line
    assert few_step_warnings(PRESETS["lcm-lora"], 8, 2.0) == []
    assert few_step_warnings(PRESETS["lcm-lora"], 9, 2.5)[1].startswith("CFG 2.5 is outside")


def test_a_few_step_model_brings_its_card():
    defaults = replace(DEFAULTS, few_step=TURBO)
    r = res(defaults)
    assert (r.sampler, r.spacing, r.steps, r.cfg, r.warnings) == ("Euler a", "trailing", 1, 1.0, ())
    r = res(defaults, steps=8)
    assert len(r.warnings) == 1 and "SD-Turbo" in r.warnings[0]
    assert res(defaults, preset="lcm-lora").sampler == "LCM"            # a named preset wins over the model's


@pytest.mark.parametrize("kw,message", [
    (dict(preset="turbo"), "unknown preset 'turbo'; choose from: sd-turbo, lcm-lora"),
    (dict(spacing="uniform"), "unknown spacing 'uniform'; choose from: normal, karras"),
    (dict(spacing="lcm", steps=51), "the lcm spacing takes at most 50 steps"),
    (dict(spacing="lcm", steps=4, hires=HiresFix(steps=60)), "the lcm spacing takes at most 50 steps, not 60"),
])
def test_bad_presets_and_spacings_are_refused(kw, message):
    with pytest.raises(RequestError, match=message):
        res(**kw)


def test_settings_are_checked_when_made():
    with pytest.raises(ValueError):
        FewStepSettings("x", "LCM", "lcm", (2, 8), (1.0, 2.0), 1, 1.0)   # default outside its range
    assert get_preset(" SD_Turbo ") is TURBO


def test_the_pipeline_walks_the_requested_spacing(tiny_pipe):
    seen = []
    request = resolve(GenerationRequest(prompt="x", seed=3, preset="sd-turbo", steps=3, width=32, height=32),
                      tiny_pipe.defaults)
    sigmas = spacing("trailing", tiny_pipe.model.schedule, 3)

    def spy(x, sigma, _inner=tiny_pipe.model.denoiser, **cond):
        seen.append(float(sigma[0]))
        return _inner(x, sigma, **cond)

    tiny_pipe.model.denoiser, saved = spy, tiny_pipe.model.denoiser
    try:
        result = tiny_pipe.generate(request)
    finally:
        tiny_pipe.model.denoiser = saved
    assert seen == pytest.approx(sigmas[:-1].tolist(), rel=1e-6)      # CFG 1: one call a step, at σ(999), ...
    record = result.records[0]
    assert (record.sampler, record.spacing, record.steps, record.cfg) == ("Euler a", "trailing", 3, 1.0)
    assert "Schedule type: trailing" in record.to_parameters()


def test_the_record_keeps_the_spacing():
    rec = GenerationRecord(prompt="p", negative_prompt="", seed=1, steps=4, sampler="LCM", cfg=1.0, width=64,
                           height=64, model_name="m", model_hash="0123456789", spacing="lcm")
    assert GenerationRecord.from_json(rec.to_json()) == rec
    assert GenerationRecord.from_parameters(rec.to_parameters()).spacing == "lcm"
    # the sampler's own spacing is not written (A1111's text stays as before), and reads back as None
    plain = replace(rec, sampler="Euler", spacing="normal")
    assert "Schedule type" not in plain.to_parameters()
    assert GenerationRecord.from_parameters(plain.to_parameters()).spacing is None
    # A1111's own names: Karras stays the sampler's suffix, Automatic means the sampler's
    text = "p\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64"
    assert (GenerationRecord.from_parameters(text).sampler, GenerationRecord.from_parameters(text).spacing) == \
        ("DPM++ 2M Karras", None)
    assert GenerationRecord.from_parameters(text.replace("Karras", "Automatic")).spacing is None


def test_sd_turbo_files_are_known_by_name(tmp_path):
    from marble.checkpoints.checkpoint import Checkpoint
    from marble.checkpoints.detect import with_few_step
    from marble.models.latent_diffusion import tiny_config

    def ckpt(name, kind="single-file"):
        return Checkpoint(tiny_config(), {}, Path(tmp_path / f"{name}.safetensors"), "0123456789", kind)

    for name in ("sd_turbo", "sd_xl_turbo_1.0_fp16", "SDXL-Turbo"):
        assert with_few_step(ckpt(name)).config.few_step == TURBO, name
    for name in ("v1-5-pruned-emaonly", "turbovision_xl", "mysd_turbo"):
        assert with_few_step(ckpt(name)).config.few_step is None, name
    assert with_few_step(ckpt("sd_turbo", kind="marble")).config.few_step is None   # marble files say it themselves


def test_the_few_step_key_round_trips_through_a_marble_file(tmp_path):
    from marble.checkpoints.checkpoint import Checkpoint
    from marble.checkpoints.marble_format import read_marble, write_marble
    from marble.checkpoints.resolve import random_model

    model = random_model()
    config = model.config.replace(few_step=PRESETS["lcm-lora"])
    path = write_marble(Checkpoint(config, model.state_dict(), tmp_path / "x", "", "marble"), tmp_path / "few.safetensors")
    assert read_marble(path).config.few_step == PRESETS["lcm-lora"]


def test_a1111_schedule_types():
    from marble.server.a1111_api import _spacing
    assert [_spacing(v) for v in (None, "", "Automatic", "automatic", "Uniform", "Karras", "trailing")] == \
        [None, None, None, None, "normal", "karras", "trailing"]
    with pytest.raises(RequestError, match="unknown spacing 'sgm uniform'"):
        res(spacing=_spacing("SGM Uniform"))


def test_cli_preset_spacing_and_warning(tmp_path):
    from typer.testing import CliRunner

    from marble.cli.app import app
    from marble.png import read_record
    r = CliRunner().invoke(app, ["generate", "x", "--model", "tiny-random", "--preset", "sd-turbo", "--steps", "6",
                                 "--seed", "1", "--size", "32x32", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "warning: 6 steps is outside what this few-step model supports; the SD-Turbo model card" in r.stderr
    record = read_record(Path(r.stdout.strip()))
    assert (record.sampler, record.spacing, record.steps, record.cfg) == ("Euler a", "trailing", 6, 1.0)
    again = CliRunner().invoke(app, ["generate", "--from", r.stdout.strip(), "--out", str(tmp_path)])
    assert again.exit_code == 0 and read_record(Path(again.stdout.strip())).spacing == "trailing"
    from PIL import Image
    assert Image.open(r.stdout.strip()).tobytes() == Image.open(again.stdout.strip()).tobytes()
    bad = CliRunner().invoke(app, ["generate", "x", "--model", "tiny-random", "--spacing", "sgm", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown spacing 'sgm'" in bad.stderr
