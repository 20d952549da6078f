"""ControlNet at the CLI: `marble generate --control IMAGE --control-model PATH ...` (repeatable as a
group), the record's units and `--from` replay, bad input as one line + exit 2 with nothing written;
the preprocessors that need no weights."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from marble.adapters.preprocess import canny, module_name, preprocess
from marble.checkpoints.controlnet_files import ControlNetFile, write_controlnet
from marble.cli import app
from marble.models.controlnet import ControlNet, controlnet_config
from marble.models.latent_diffusion import tiny_config
from marble.png import read_record
from sd_fixtures import random_controlnet_file, randomize_

runner = CliRunner()
FAST = ["--model", "tiny-random", "--steps", "3", "--size", "32x32", "--seed", "5"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random (non-zero) ControlNet for the tiny-random model, in lllyasviel's layout, and control images."""
    root = tmp_path_factory.mktemp("cn-cli")
    path = random_controlnet_file(root / "edges.safetensors")
    images = []
    for i, box in enumerate([(4, 4, 20, 28), (12, 2, 30, 14)]):
        im = Image.new("RGB", (32, 32), "white")
        im.paste((0, 0, 0), box)
        images.append(im)
        im.save(root / f"sketch{i}.png")
    return root, path


def generate(*args) -> tuple[int, str, list[Path]]:
    r = runner.invoke(app, ["generate", *map(str, args)])
    return r.exit_code, r.output, [Path(line) for line in r.stdout.split() if line.endswith(".png")]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_generate_with_units_records_and_replays_them(files, tmp_path):
    root, model = files
    code, out, (plain,) = generate("a circle", *FAST, "--out", tmp_path / "a")
    assert code == 0, out
    code, out, (one,) = generate("a circle", *FAST, "--out", tmp_path / "b", "--control", root / "sketch0.png",
                                 "--control-model", model, "--control-module", "invert", "--control-weight", "1.5")
    assert code == 0, out
    assert np.abs(pixels(one) - pixels(plain)).max() > 10
    record = read_record(one)
    (unit,) = record.controlnets
    assert unit["module"] == "invert" and unit["weight"] == 1.5 and unit["path"] == str(model.resolve())
    assert 'ControlNet 0: "Module: invert, Model: edges [' in record.to_parameters()
    # two units as a group; the second acts only on the second half of the steps
    code, out, (two,) = generate("a circle", *FAST, "--out", tmp_path / "c",
                                 "--control", root / "sketch0.png", "--control", root / "sketch1.png",
                                 "--control-model", model, "--control-model", model,
                                 "--control-start", "0", "--control-start", "0.5",
                                 "--control-end", "1", "--control-end", "1",
                                 "--control-mode", "Balanced", "--control-mode", "ControlNet is more important",
                                 "--control-resize", "Just Resize", "--control-resize", "Resize and Fill")
    assert code == 0, out
    assert len(read_record(two).controlnets) == 2
    # --from replays the units when the control image is given again, exactly
    code, out, (again,) = generate("--from", one, "--out", tmp_path / "d", "--control", root / "sketch0.png")
    assert code == 0, out
    assert np.array_equal(pixels(again), pixels(one))
    # without it, a warning and the plain image
    code, out, (bare,) = generate("--from", one, "--out", tmp_path / "e")
    assert code == 0 and "not replayed" in out
    assert np.array_equal(pixels(bare), pixels(plain))


def test_bad_control_input_is_one_line_exit_2_and_writes_nothing(files, tmp_path):
    root, model = files
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    other = tmp_path / "other.safetensors"   # a ControlNet for another U-Net width
    from dataclasses import replace
    config = controlnet_config(replace(tiny_config().unet, model_channels=16, groups=4), 2)
    write_controlnet(ControlNetFile(config, ControlNet(config).state_dict(), tmp_path, "", "marble"), other,
                     "single-file")
    sketch = root / "sketch0.png"
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    pickle = tmp_path / "control.pth"
    torch.save({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, pickle)
    cases = [
        (["--control", sketch, "--control-model", corrupt], "not a valid safetensors file"),
        (["--control", sketch, "--control-model", pickle], "--allow-pickle"),
        (["--control", text, "--control-model", model], "not a readable image"),
        (["--control", sketch, "--control-model", other], "does not fit"),
        (["--control", sketch, "--control-model", "no-such-net"], "unknown ControlNet"),
        (["--control", sketch, "--control-model", model, "--control-weight", "2.5"], "weight"),
        (["--control", sketch, "--control-model", model, "--control-start", "0.9", "--control-end", "0.2"], "start"),
        (["--control", sketch, "--control-model", model, "--control-module", "openpose"], "weights"),
        (["--control", sketch, "--control-model", model, "--control-mode", "loud"], "control mode"),
        (["--control", sketch], "ControlNet is required"),
        (["--control", sketch, "--control-model", model, "--control-weight", "1", "--control-weight", "1"], "once per"),
        (["--control-model", model], "needs --control"),
        (["--control", sketch] * 4 + ["--control-model", model] * 4, "at most 3"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        code, output, _ = generate("a circle", *FAST, "--out", out, *extra)
        assert code == 2, (extra, output)
        assert message in output and len(output.strip().splitlines()) == 1, (extra, output)
        assert not out.exists()


def test_preprocessors():
    im = Image.new("RGB", (24, 24), "white")
    im.paste((0, 0, 0), (6, 6, 18, 18))
    edges = np.asarray(preprocess(im, "canny"))[:, :, 0] > 0
    # a black square on white: edges on its border rows and columns, nothing inside or far outside
    assert edges[6:18, 5:7].any(axis=1).all() and edges[5:7, 6:18].any(axis=0).all()
    assert not edges[9:15, 9:15].any() and not edges[:3].any()
    assert np.array_equal(np.asarray(preprocess(im, "invert")), 255 - np.asarray(im))
    scribble = np.asarray(preprocess(im, "scribble"))
    assert scribble[12, 12, 0] == 255 and scribble[0, 0, 0] == 0     # dark strokes become white lines
    assert np.array_equal(np.asarray(preprocess(im, "seg")), np.asarray(im))
    # hysteresis: a weak edge joined to a strong one survives, an isolated weak one does not
    grey = torch.zeros(9, 12)
    grey[:, 6:] = 150.0                  # strong step: |gx| + |gy| = 600 at the boundary
    grey[:, :2] = 30.0                   # weak step: 120, between the thresholds, not connected
    assert canny(grey, 100, 200)[:, 5:7].any() and not canny(grey, 100, 200)[:, :3].any()
    assert canny(grey, 100, 700).sum() == 0
    with pytest.raises(ValueError, match="needs downloaded weights"):
        module_name("depth_midas")


def test_fp16_storage_keeps_the_controlnet_in_fp16_and_computes_in_float32(files):
    """With --weights fp16 the ControlNet is stored like the U-Net and the image is exactly that of a
    float32 pipeline whose model weights were rounded to fp16 (the ControlNet file is fp16 already)."""
    from marble.adapters.controlnet import ControlSpec
    from marble.checkpoints.resolve import load_model
    from marble.pipeline import Pipeline
    from marble.request import GenerationRequest, resolve
    root, _ = files
    folder = root / "fp16"
    folder.mkdir(exist_ok=True)
    config = controlnet_config(tiny_config().unet, 2)
    state = {k: v.half() for k, v in randomize_(ControlNet(config), seed=4).state_dict().items()}
    write_controlnet(ControlNetFile(config, state, root, "", "marble"), folder / "half.safetensors", "single-file")
    stored = load_model("tiny-random", storage=torch.float16)
    rounded = load_model("tiny-random")
    with torch.no_grad():
        for p in rounded.model.parameters():
            p.copy_(p.half().float())
    spec = ControlSpec(image=Image.open(root / "sketch0.png"), model="half", module="invert")
    images = []
    for loaded in (stored, rounded):
        pipe = Pipeline(loaded, control_dir=folder)
        request = resolve(GenerationRequest(prompt="a circle", seed=2, steps=3, width=32, height=32,
                                            controls=(spec,)), pipe.defaults)
        images.append(np.asarray(pipe.generate(request).images[0]))
        net = pipe.control_nets(request)[0].net
        assert next(net.parameters()).dtype == (torch.float16 if loaded is stored else torch.float32)
    assert np.array_equal(*images)


def test_a_pickled_controlnet_runs_with_allow_pickle_as_its_safetensors_twin(files, tmp_path):
    from marble.checkpoints.controlnet_files import read_controlnet
    root, model = files
    pickle = tmp_path / "edges.pth"
    torch.save({"control_model." + k: v for k, v in read_controlnet(model).state.items()}, pickle)
    args = ["a circle", *FAST, "--control", root / "sketch0.png", "--control-module", "invert"]
    code, out, (a,) = generate(*args, "--out", tmp_path / "a", "--control-model", model)
    assert code == 0, out
    code, out, (b,) = generate(*args, "--out", tmp_path / "b", "--control-model", pickle, "--allow-pickle")
    assert code == 0, out
    assert np.array_equal(pixels(a), pixels(b))
