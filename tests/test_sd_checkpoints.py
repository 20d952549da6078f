"""Loading SD 1.x/2.x weights: single files against diffusers' own from_single_file, lossless
round trips between the three layouts in fp32/fp16/bf16, architecture recognition on the full-size
key sets, errors that name keys, opt-in pickles that never run code, and peak memory."""
import hashlib
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

from marble.checkpoints.checkpoint import Checkpoint, expected_state, from_model
from marble.checkpoints.convert import write_checkpoint
from marble.checkpoints.detect import open_checkpoint
from marble.checkpoints.diffusers_folder import write_diffusers
from marble.checkpoints.marble_format import read_marble, write_marble
from marble.checkpoints.resolve import load_model, random_model
from marble.checkpoints.sd_single_file import (IGNORED_KEYS, SD2_TEXT, convert_state, detect_preset,
                                               single_file_state, to_marble_fn, write_single_file)
from marble.errors import ModelLoadError
from marble.models.stable_diffusion import sd_config
from marble.tensor_file import read_header
from sd_fixtures import diffusers_oracle, tiny_sd

FORMATS = ["marble", "diffusers", "single-file"]


def model_of(family="sd1", in_channels=4, seed=0):
    return random_model(lambda: tiny_sd(family, in_channels), seed=seed)


def cast(ckpt: Checkpoint, dtype) -> Checkpoint:
    return replace(ckpt, state={k: v.to(dtype) for k, v in ckpt.state.items()})


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# --- against diffusers' own single-file loader ------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_matches_diffusers_from_single_file(family, tmp_path):
    """marble writes an SD single file (SD2: OpenCLIP text layout, fused in_proj); diffusers'
    from_single_file (its own converter) loads the very tensors marble loads, bit for bit."""
    diffusers = diffusers_oracle()
    from marble.checkpoints.diffusers_keys import rename, unet_table, vae_table, vae_to_diffusers_tensor
    model = model_of(family, seed=3)
    path = write_single_file(from_model(model), tmp_path / "model.safetensors")
    assert any(k.startswith(SD2_TEXT if family == "sd2" else "cond_stage_model.transformer.text_model.")
               for k in read_header(path).entries)
    config_folder = write_diffusers(from_model(model_of(family, seed=99)), tmp_path / "configs")  # configs only
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(config_folder),
                                                              local_files_only=True, safety_checker=None)
    ours = load_model(str(path))
    state = ours.model.state_dict()
    unet, vae, text = pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict()
    ut, vt = unet_table(model.config.unet), vae_table(model.config.vae)
    for key, tensor in state.items():
        part, inner = key.split(".", 1)
        if part == "unet":
            theirs = unet[rename(inner, ut)]
        elif part == "vae":
            theirs, tensor = vae[rename(inner, vt)], vae_to_diffusers_tensor(inner, tensor)
        else:
            theirs = text[inner.removeprefix("text_model.")] if inner.removeprefix("text_model.") in text else text[inner]
        assert torch.equal(theirs, tensor), key
    assert len(state) == len(unet) + len(vae) + len(text)
    assert ours.hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]   # A1111's model hash
    assert ours.model.config.prediction == ("eps" if family == "sd1" else "v")


# --- lossless round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("family, dtype", [("sd1", torch.float32), ("sd2", torch.float32), ("sd1", torch.float16),
                                           ("sd2", torch.bfloat16)], ids=["sd1-fp32", "sd2-fp32", "sd1-fp16", "sd2-bf16"])
def test_round_trips_through_every_layout_are_bit_exact(family, dtype, tmp_path):
    start = cast(from_model(model_of(family, seed=1)), dtype)
    for first in FORMATS:
        a = write_checkpoint(start, tmp_path / first, first)
        for second in FORMATS:
            b = write_checkpoint(open_checkpoint(a), tmp_path / f"{first}-{second}", second)
            back = open_checkpoint(b)
            assert_same_tensors(back.state, start.state)
            assert back.config == start.config


def test_a_diffusers_folder_round_trips_through_marble_bit_exactly(tmp_path):
    """A folder diffusers wrote -> marble file -> diffusers folder: every weight file holds the same tensors."""
    diffusers_oracle()
    from test_sd_parity import diffusers_folder

    class Factory:
        def mktemp(self, name):
            (tmp_path / name).mkdir()
            return tmp_path / name

    original, _, _ = diffusers_folder(Factory(), "sd2", 4)
    marble_file = write_marble(open_checkpoint(original), tmp_path / "m.safetensors")
    again = write_diffusers(read_marble(marble_file), tmp_path / "again")
    for part, name in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        a = load_file(original / part / f"{name}.safetensors")
        b = load_file(again / part / f"{name}.safetensors")
        if part == "text_encoder":   # transformers 5 saves without the text_model. prefix; marble writes it
            a = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in a.items()}
        assert_same_tensors(a, b)


# --- recognising the released architectures from their keys -------------------------------------------

class MetaSource:
    """A stand-in single file holding meta tensors: keys and shapes only, no data."""

    def __init__(self, tensors):
        self.tensors, self.path = tensors, Path("fake.safetensors")

    def shapes(self):
        return {k: (tuple(v.shape), v.dtype) for k, v in self.tensors.items()}

    def read(self, names, dtype):
        return ((n, self.tensors[n]) for n in names)


def full_size_single_file(preset: str) -> dict:
    """The key set of a released SD file of this architecture (meta tensors), with the extras real
    files carry: ldm's schedule buffers, EMA leftovers, position_ids, and for SD2 OpenCLIP's 24th
    resblock, text_projection and logit_scale."""
    config = sd_config(preset)
    state = single_file_state(Checkpoint(config, expected_state(config), Path("x"), "", "marble"))
    meta = lambda *s: torch.empty(s, device="meta")   # noqa: E731
    extra = {k: meta(1000) for k in IGNORED_KEYS if not k.startswith(SD2_TEXT)}
    extra["model_ema.decay"] = meta()
    if preset.startswith("sd2"):
        last = f"{SD2_TEXT}transformer.resblocks.23."
        extra.update({SD2_TEXT + "text_projection": meta(1024, 1024), SD2_TEXT + "logit_scale": meta(),
                      last + "attn.in_proj_weight": meta(3072, 1024), last + "ln_1.weight": meta(1024)})
    else:
        extra["cond_stage_model.transformer.text_model.embeddings.position_ids"] = meta(1, 77)
    return {**state, **extra}


@pytest.mark.parametrize("preset", ["sd15", "sd15-inpaint", "sd21-v", "sd2-inpaint"])
def test_released_architectures_are_recognised_and_fully_mapped(preset):
    keys = full_size_single_file(preset)
    assert detect_preset({k: tuple(v.shape) for k, v in keys.items()}, Path("x")) == preset
    config = sd_config(preset)
    state = convert_state(MetaSource(keys), to_marble_fn(config), expected_state(config), None)
    assert state.keys() == expected_state(config).keys()
    n_unet = sum(v.numel() for k, v in state.items() if k.startswith("unet."))
    assert n_unet == {"sd15": 859_520_964, "sd21-v": 865_910_724}.get(preset, n_unet)
    if preset.startswith("sd2"):   # q/k/v split out of OpenCLIP's fused in_proj
        assert state["text_encoder.text_model.encoder.layers.22.self_attn.k_proj.weight"].shape == (1024, 1024)
    assert config.unet.in_channels == (9 if "inpaint" in preset else 4)


def test_sdxl_and_unknown_files_are_refused_by_name(tmp_path):
    keys = {**full_size_single_file("sd15"), "conditioner.embedders.0.x": torch.empty(1, device="meta")}
    with pytest.raises(ModelLoadError, match="SDXL"):
        detect_preset({k: tuple(v.shape) for k, v in keys.items()}, Path("x"))
    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ModelLoadError, match="neither a marble model nor a Stable Diffusion"):
        load_model(str(other))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_model(str(tmp_path / "folder"))


# --- prediction type ---------------------------------------------------------------------------------

def test_prediction_comes_from_override_then_sidecar_yaml_then_the_file(tmp_path):
    path = write_single_file(from_model(model_of("sd1")), tmp_path / "m.safetensors")
    assert open_checkpoint(path).config.prediction == "eps"
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert open_checkpoint(path).config.prediction == "v"
    assert open_checkpoint(path, prediction="eps").config.prediction == "eps"
    assert load_model(str(path), prediction="x0").model.config.prediction == "x0"
    folder = write_diffusers(from_model(model_of("sd2")), tmp_path / "d")
    assert open_checkpoint(folder).config.prediction == "v"       # from scheduler_config.json
    assert open_checkpoint(folder, prediction="eps").config.prediction == "eps"
    assert sd_config("sd15").prediction == "eps" and sd_config("sd21-v").prediction == "v"
    assert sd_config("sd2-inpaint").prediction == "eps" and sd_config("sd21-base").prediction == "eps"


# --- errors -------------------------------------------------------------------------------------------

def test_missing_and_unexpected_keys_are_named_in_the_files_own_terms(tmp_path):
    good = write_single_file(from_model(model_of("sd1")), tmp_path / "good.safetensors")
    header = read_header(good)
    tensors = load_file(str(good))
    del tensors["model.diffusion_model.out.2.bias"]
    tensors["model.diffusion_model.extra_block.weight"] = torch.zeros(3)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=header.metadata)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path / "bad.safetensors"))
    message = str(e.value)
    assert "model.diffusion_model.out.2.bias" in message and "model.diffusion_model.extra_block.weight" in message
    assert "\n" not in message

    folder = write_diffusers(from_model(model_of("sd1")), tmp_path / "d")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(unet_file))
    tensors["conv_out.weight"] = torch.zeros(4, 32, 1, 1)
    save_file(tensors, str(unet_file))
    with pytest.raises(ModelLoadError, match=r"unet/conv_out.weight is \(4, 32, 1, 1\)"):
        load_model(str(folder))


def test_unsupported_diffusers_features_are_refused_by_name(tmp_path):
    import json
    folder = write_diffusers(from_model(model_of("sd1")), tmp_path / "d")
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    with pytest.raises(ModelLoadError, match="addition_embed_type = 'text_time'"):
        load_model(str(folder))


# --- pickles -----------------------------------------------------------------------------------------

def test_pickles_load_only_when_allowed_and_only_tensors(tmp_path):
    path = write_single_file(from_model(model_of("sd1")), tmp_path / "m.safetensors")
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 10}, ckpt)
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(str(ckpt))
    reference = open_checkpoint(path)
    # a pickle carries no config: tiny shapes must be declared (full-size SD files are recognised)
    from marble.checkpoints.sd_single_file import read_single_file
    from_pickle = read_single_file(ckpt, allow_pickle=True, config=tiny_sd("sd1"))
    assert_same_tensors(from_pickle.state, reference.state)
    with pytest.raises(ModelLoadError, match="does not match"):   # same checks as safetensors
        load_model(str(ckpt), allow_pickle=True)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model(str(evil), allow_pickle=True)
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callback": Evil()}, tmp_path / "evil2.ckpt")
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model(str(tmp_path / "evil2.ckpt"), allow_pickle=True)
    assert not marker.exists()


# --- memory ------------------------------------------------------------------------------------------

PEAK_SCRIPT = r"""
import sys, torch
from marble.checkpoints.resolve import load_model
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
load_model(sys.argv[2])   # warm-up on a tiny file: imports, tokenizer vocabulary, meta-device machinery
open("/proc/self/clear_refs", "w").write("5")     # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
loaded = load_model(sys.argv[1])
weights = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
print(status("VmHWM") - before, weights)
"""


@pytest.mark.parametrize("stored", [torch.float32, torch.float16], ids=["fp32-file", "fp16-file"])
def test_peak_memory_while_loading_stays_within_1_3x_of_the_weights(stored, tmp_path):
    """A ~150 MB SD-layout file (SD1.5's U-Net at a fifth of the width) loads into fp32 with
    peak RSS growth ≤ 1.3 × the loaded weights: tensors are read one by one into place. One-time
    costs that do not grow with the weights (imports, the tokenizer's vocabulary) are paid first."""
    config = replace(tiny_sd("sd1"), unet=replace(sd_config("sd15").unet, model_channels=64, context_dim=32, groups=32))
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g).to(stored) for k, v in expected_state(config).items()}
    path = write_single_file(Checkpoint(config, state, Path("x"), "", "marble"), tmp_path / "big.safetensors")
    del state
    small = write_single_file(from_model(model_of("sd1")), tmp_path / "small.safetensors")
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(small)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    peak, weights = (int(v) for v in out.stdout.split())
    assert weights > 100e6
    assert peak <= 1.3 * weights, f"peak {peak / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("zero_snr", [False, True])
def test_scheduler_configs_round_trip_through_diffusers(tmp_path, zero_snr):
    from marble.checkpoints.diffusers_folder import schedule_from_diffusers, scheduler_config_to_diffusers
    from marble.models.latent_diffusion import tiny_config
    schedule = {"name": "scaled_linear", "n": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    if zero_snr:
        schedule["zero_terminal_snr"] = True
    config = tiny_config().replace(schedule=schedule, prediction="v")
    exported = scheduler_config_to_diffusers(config)
    assert exported["rescale_betas_zero_snr"] is zero_snr
    assert schedule_from_diffusers(exported, tmp_path / "scheduler_config.json") == (schedule, "v")
    # and diffusers reads the exported config into the same noise levels. diffusers works in float32
    # on numbers ≤ 1 (ā, and sqrt(ā) for the rescale), so sqrt(ā) agrees to a few float32 ulps of 1;
    # relative agreement is coarser where it cancels (σ near t = 0, ā near the zero-SNR end)
    diffusers = diffusers_oracle()
    theirs = diffusers.EulerDiscreteScheduler.from_config(exported)
    from marble.diffusion.schedule import make_schedule
    ours = make_schedule(**schedule)
    torch.testing.assert_close(theirs.alphas_cumprod.double().sqrt(), ours.alphas_cumprod.sqrt(), rtol=0, atol=3e-7)
