"""ControlNet: the network against diffusers' ControlNetModel on identical random weights, and its files.

- residuals and the U-Net output with them agree with ControlNetModel + UNet2DConditionModel within
  1e-4 relative (SD1, SD2 and SDXL shapes), at a conditioning scale and in guess mode;
- without residuals the U-Net is bit-exact what it was; a fresh ControlNet's residuals are zero;
- lllyasviel layout (with and without `control_model.`), diffusers folder and single file, marble's
  file: the same tensors; `marble convert` both ways; bad files: one line, exit 2.
"""
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from marble.checkpoints.controlnet_files import (ControlNetFile, fit, load_controlnet, read_controlnet,
                                                 write_controlnet)
from marble.checkpoints.diffusers_keys import inverse, rename, unet_table
from marble.errors import ModelLoadError
from marble.models.controlnet import ControlNet, controlnet_config
from marble.models.unet import UNET_PRESETS, UNet
from marble.tensor_file import safetensors_writer
from marble.fileio import write_new
from sd_fixtures import SD1_UNET, SD2_UNET, diffusers_oracle, diffusers_unet_kwargs, randomize_

diffusers = diffusers_oracle()

HINT = (16, 32, 64)    # two stride-2 steps: the tiny VAE's factor 4


def controlnet_kwargs(family: str) -> dict:
    """diffusers' ControlNetModel of the same shape as the family's tiny U-Net."""
    if family == "sdxl":
        from sdxl_oracle import diffusers_sdxl_unet_kwargs
        kw = diffusers_sdxl_unet_kwargs()
    else:
        kw = diffusers_unet_kwargs(family)
    for key in ("sample_size", "out_channels", "up_block_types"):
        kw.pop(key)
    return dict(kw, conditioning_embedding_out_channels=HINT)


def unet_config(family: str):
    return {"sd1": SD1_UNET, "sd2": SD2_UNET, "sdxl": UNET_PRESETS["sdxl-tiny"]}[family]


def unet_kwargs(family: str) -> dict:
    if family == "sdxl":
        from sdxl_oracle import diffusers_sdxl_unet_kwargs
        return diffusers_sdxl_unet_kwargs()
    return diffusers_unet_kwargs(family)


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def pair(request, tmp_path_factory):
    """diffusers' ControlNetModel + UNet2DConditionModel (random), saved; marble's read from the folder."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    family = request.param
    theirs = randomize_(ControlNetModel(**controlnet_kwargs(family)), seed=11)
    unet = randomize_(UNet2DConditionModel(**unet_kwargs(family)), seed=12)
    folder = tmp_path_factory.mktemp(f"cn-{family}") / "controlnet"
    theirs.save_pretrained(folder)
    config = unet_config(family)
    ours_unet = UNet(config)
    ours_unet.load_state_dict({rename(k, inverse(unet_table(config))): v for k, v in unet.state_dict().items()})
    cn = read_controlnet(folder, unet=config)
    return family, theirs, unet, load_controlnet(cn), ours_unet.eval(), cn, folder


def inputs(family: str, batch: int = 2):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 4, 16, 12, generator=g)
    t = torch.tensor([999.0, 250.5, 3.0][:batch])
    context = torch.randn(batch, 9, 64 if family == "sdxl" else 32, generator=g)
    hint = torch.rand(batch, 3, 64, 48, generator=g)
    extra, y = {}, None
    if family == "sdxl":   # y = [pooled, Fourier features of the 6 size numbers] = diffusers' text_embeds + time_ids
        from marble.models.conditioning import fourier_features
        pooled = torch.randn(batch, 32, generator=g)
        time_ids = torch.tensor([[64.0, 48.0, 0.0, 0.0, 64.0, 48.0]] * batch)
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        y = torch.cat([pooled, fourier_features(time_ids, 8)], dim=1)
    return x, t, context, hint, extra, y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
@pytest.mark.parametrize("guess_mode", [False, True])
def test_residuals_and_unet_output_match_diffusers(pair, guess_mode):
    family, theirs, unet, net, ours_unet, _, _ = pair
    x, t, context, hint, extra, y = inputs(family)
    scale = 0.7
    down, mid = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, conditioning_scale=scale,
                       guess_mode=guess_mode, return_dict=False, **extra)
    want = [*down, mid]
    residuals = net(x, t, context, hint, y)
    n = len(residuals)
    # diffusers' guess mode: down residual i of n − 1 × 10^(−1 + i/(n − 1)), the middle one × 1
    # (torch.logspace(-1, 0, n) over the n − 1 down residuals and the middle)
    scales = [10 ** (-1 + i / (n - 1)) for i in range(n - 1)] + [1.0] if guess_mode else [1.0] * n
    got = [r * scale * s for r, s in zip(residuals, scales)]
    assert len(got) == len(want) == len(ours_unet.input_blocks) + 1
    for a, b in zip(got, want):
        assert b.abs().max() > 1e-3 and rel(a, b) < 1e-4
    out_theirs = unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid, **extra).sample
    out_ours = ours_unet(x, t, context, y=y, control=got)
    plain = ours_unet(x, t, context, y=y)
    assert (out_theirs - plain).abs().max() > 1e-2   # the residuals change the output
    assert rel(out_ours, out_theirs) < 1e-4


@torch.no_grad()
def test_no_control_is_bit_exact_and_a_fresh_controlnet_adds_nothing():
    torch.manual_seed(0)
    unet = UNet(SD1_UNET).eval()
    randomize_(unet, seed=3)
    x, t, context, hint, _, _ = inputs("sd1")
    before = unet(x, t, context)
    net = ControlNet(controlnet_config(SD1_UNET, 4)).eval()
    residuals = net(x, t, context, hint)
    assert all(torch.count_nonzero(r) == 0 for r in residuals)   # zero convolutions: the paper's identity at start
    assert torch.equal(unet(x, t, context, control=residuals), before)
    assert torch.equal(unet(x, t, context, control=None), before)


# --- files -----------------------------------------------------------------------------------------

def _write(path, state):
    write_new(path, safetensors_writer(state, {"format": "pt"}))
    return path


@torch.no_grad()
def test_every_layout_loads_the_same_tensors(pair, tmp_path):
    family, theirs, _, _, _, cn, folder = pair
    config = unet_config(family)
    single = tmp_path / "lllyasviel.safetensors"
    write_controlnet(cn, single, "single-file")
    bare = _write(tmp_path / "bare.safetensors", dict(cn.state))                           # no control_model. prefix
    diffusers_file = _write(tmp_path / "diffusers.safetensors", dict(theirs.state_dict()))  # diffusers keys, no config
    marble_file = write_controlnet(cn, tmp_path / "marble.safetensors", "marble")
    back = write_controlnet(read_controlnet(single), tmp_path / "back", "diffusers")        # inferred config
    for path, kind in ((single, "single-file"), (bare, "single-file"), (diffusers_file, "diffusers"),
                       (marble_file, "marble"), (back, "diffusers")):
        other = read_controlnet(path, unet=config)
        assert other.kind == kind
        assert other.config == cn.config, path
        assert other.state.keys() == cn.state.keys()
        assert all(torch.equal(other.state[k], v) for k, v in cn.state.items()), path
    # the diffusers folder marble wrote loads in diffusers with the very tensors
    from diffusers import ControlNetModel
    again = ControlNetModel.from_pretrained(back)
    ref = theirs.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.state_dict().items())


def test_a_controlnet_for_another_architecture_is_refused(pair):
    """Residuals of other widths or levels, another context width: refused. The copy's own transformers
    may differ from the U-Net's (SD1 and SD2 tiny shapes share their residuals and context)."""
    from dataclasses import replace
    family, _, _, _, _, cn, folder = pair
    ours = unet_config(family)
    for other, what in ((UNET_PRESETS["sdxl-tiny"] if family != "sdxl" else SD1_UNET, "level widths"),
                        (replace(ours, context_dim=48), "context width"),
                        (replace(ours, num_res_blocks=1), "res blocks per level")):
        with pytest.raises(ModelLoadError, match=f"does not fit this model's U-Net \\({what}"):
            read_controlnet(folder, unet=other)
    if family == "sd1":   # an SD2-shaped copy beside the SD1-shaped U-Net: its own transformers, read from the file
        shallow = read_controlnet(folder, unet=SD2_UNET)
        assert shallow.config.unet == replace(cn.config.unet, head_dim=SD2_UNET.head_dim,   # heads: the U-Net's
                                              num_heads=SD2_UNET.num_heads)
        assert not shallow.config.unet.linear_projection and shallow.config.unet.transformer_depth == 1


def test_bad_files_are_one_line_errors(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    pickle = tmp_path / "control.pth"
    torch.save({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, pickle)
    other = _write(tmp_path / "lora.safetensors", {"lora_unet_x.lora_up.weight": torch.zeros(2, 2)})
    for path, message in ((corrupt, "not a valid safetensors"), (pickle, "pickle"), (other, "not a ControlNet"),
                          (tmp_path / "missing.safetensors", "no ControlNet file")):
        with pytest.raises(ModelLoadError, match=message) as e:
            read_controlnet(path)
        assert "\n" not in str(e.value)


def test_convert_cli_both_ways_and_errors(pair, tmp_path):
    family, _, _, _, _, cn, folder = pair
    if family != "sd1":
        pytest.skip("one family is enough for the CLI")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    run = lambda *a: subprocess.run([sys.executable, "-m", "marble", "convert", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, env=env)
    single = tmp_path / "cn.safetensors"
    r = run(folder, single, "--to", "single-file")
    assert r.returncode == 0, r.stderr
    r = run(single, tmp_path / "cn-diffusers", "--to", "diffusers")
    assert r.returncode == 0, r.stderr
    again = read_controlnet(tmp_path / "cn-diffusers", unet=SD1_UNET)
    assert all(torch.equal(again.state[k], v) for k, v in cn.state.items())
    pickle = tmp_path / "cn.pth"
    torch.save({"control_model." + k: v for k, v in cn.state.items()}, pickle)
    r = run(pickle, tmp_path / "refused.safetensors", "--to", "marble")
    assert r.returncode == 2 and "pickle" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "refused.safetensors").exists()
    r = run(pickle, tmp_path / "allowed.safetensors", "--to", "marble", "--allow-pickle")
    assert r.returncode == 0, r.stderr
    assert torch.equal(read_controlnet(tmp_path / "allowed.safetensors").state["middle_block_out.0.weight"],
                       cn.state["middle_block_out.0.weight"])


def test_fit_takes_the_unets_heads(pair):
    family, _, _, _, _, cn, _ = pair
    inferred = read_controlnet(cn.source if cn.source.is_file() else cn.source).config
    fitted = fit(inferred, unet_config(family), "x")
    assert fitted.unet.heads_and_dim(64) == unet_config(family).heads_and_dim(64)
    assert isinstance(cn, ControlNetFile)


def test_a_controlnet_given_as_a_model_says_so(pair, tmp_path):
    from marble.checkpoints.detect import open_checkpoint
    family, _, _, _, _, cn, folder = pair
    single = write_controlnet(cn, tmp_path / "cn.safetensors", "single-file")
    for path in (folder, single):
        with pytest.raises(ModelLoadError, match="is a ControlNet, not a model"):
            open_checkpoint(path)


@torch.no_grad()
def test_a_unet_with_coordinate_channels_takes_its_controlnet(tmp_path):
    """The copy's input conv is the U-Net's, coordinates included; a file of it loads back fitted."""
    from dataclasses import replace
    config = replace(SD1_UNET, coord_channels=True, attention_position=True)
    cn_config = controlnet_config(config, 4)
    net = randomize_(ControlNet(cn_config), seed=2)
    assert net.input_blocks[0][0].weight.shape[1] == 6
    path = write_controlnet(ControlNetFile(cn_config, net.state_dict(), tmp_path, "", "marble"),
                            tmp_path / "cn.safetensors", "single-file")
    back = read_controlnet(path, unet=config)
    assert back.config == cn_config
    loaded = load_controlnet(back)
    x, t, context, hint, _, _ = inputs("sd1")
    unet = randomize_(UNet(config), seed=3)
    residuals = loaded(x, t, context, hint)
    assert all(torch.equal(a, b) for a, b in zip(residuals, net(x, t, context, hint)))
    assert unet(x, t, context, control=residuals).shape == x.shape


def test_a_full_cldm_file_loads_its_control_model(pair, tmp_path):
    """ControlNet 1.0's full files hold the whole ControlLDM: the SD model's keys are known and skipped."""
    family, _, _, _, _, cn, _ = pair
    state = {"control_model." + k: v for k, v in cn.state.items()}
    state.update({"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3), "logvar": torch.zeros(1000),
                  "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 16, 3, 3),
                  "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(32)})
    full = _write(tmp_path / "full.safetensors", state)
    other = read_controlnet(full, unet=unet_config(family))
    assert all(torch.equal(other.state[k], v) for k, v in cn.state.items())
    state["control_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelLoadError, match="unexpected 1 keys"):
        read_controlnet(_write(tmp_path / "extra.safetensors", state), unet=unet_config(family))
