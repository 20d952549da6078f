"""The built-in ControlNet's pieces: the sketch (marble/data/sketch.py), `marble train controlnet`
(marble/train/controlnet.py) and `marble eval --control sketch` (marble/eval/control.py), on
tiny-random and a few shapes-world scenes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from marble.data.shapes import COLORS, sample_scene
from marble.data.sketch import PALETTE, sketch, sketch_indices
from marble.eval.components import label
from marble.train.checkpoint import load_checkpoint
from marble.train.config import load_config
from marble.train.distributed import init_world

CONFIG = """
kind = "controlnet"
run_dir = "{run_dir}"
steps = {steps}
batch = 2
seed = 3
log_every = 1
checkpoint_every = 2
threads = 1
ema_decay = 0.9

[model]
base = "tiny-random"

[data]
world = "shapes"
n = 6
size = 32
caption_dropout = 0.5

[optim]
lr = 1e-3
warmup = 1
"""


def write_config(tmp_path, name, steps=4):
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(run_dir=tmp_path / name, steps=steps))
    return path


def train(path, resume=False):
    from marble.train.controlnet import train_controlnet
    torch.set_num_threads(1)
    return train_controlnet(load_config(path, {"kind": "controlnet"}), init_world(), resume)


def marble_cli(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "marble", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the sketch ------------------------------------------------------------------------------------

@pytest.mark.parametrize("index", range(10))
def test_the_sketch_is_the_scenes_objects_in_their_palette_colours_on_white(index):
    scene, _ = sample_scene("heldout", 0, index, 64)
    image = sketch(scene)
    arr = np.asarray(image)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert np.array_equal(arr, np.asarray(sketch(scene))), "a pure function of the scene"
    # flat colours only: every pixel is white or a palette colour (no blending at the edges)
    colours = {tuple(int(v) for v in c) for c in arr.reshape(-1, 3)}
    assert colours <= {(255, 255, 255), *COLORS.values()}
    assert colours - {(255, 255, 255)} == {COLORS[o.color] for o in scene.objects}
    for obj in scene.objects:   # each object's bbox centre lies inside every shape of the world
        x, y = (int(v) for v in obj.center)
        assert tuple(arr[y, x]) == COLORS[obj.color]
    for x, y in ((0, 0), (63, 0), (0, 63), (63, 63)):     # MARGIN keeps objects off the edges
        assert tuple(arr[y, x]) == (255, 255, 255)
    _, n = label(np.any(arr != 255, axis=2), connectivity=8)
    assert n == len(scene.objects)
    # the index form is the same picture; scaled, the objects stay where they are
    assert np.array_equal(PALETTE[sketch_indices(scene)], arr)
    big = np.asarray(sketch(scene, 128))
    for obj in scene.objects:
        assert tuple(big[int(obj.center[1] * 2), int(obj.center[0] * 2)]) == COLORS[obj.color]


# --- the trainer -----------------------------------------------------------------------------------

def test_the_initial_controlnet_copies_the_encoder_and_changes_nothing():
    from marble.checkpoints.resolve import load_model
    from marble.train.controlnet import controlled, initial_controlnet
    model = load_model("tiny-random").model
    net = initial_controlnet(model, seed=0)
    unet = model.unet.state_dict()
    for k, v in net.state_dict().items():
        if k in unet:
            assert torch.equal(v, unet[k]), k
        elif k.startswith(("zero_convs.", "middle_block_out.")):
            assert not v.any(), k
    last = max(int(k.split(".")[1]) for k in net.state_dict() if k.startswith("input_hint_block."))
    assert not net.input_hint_block[last].weight.any() and net.input_hint_block[0].weight.any()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    hint, t = torch.rand(2, 3, 32, 32, generator=g), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        assert torch.equal(controlled(model.unet, net, hint)(x, t, ctx), model.unet(x, t, ctx))


def test_the_initial_file_loads_and_generates_exactly_the_base_image(tmp_path):
    from marble.adapters.controlnet import ControlSpec
    from marble.checkpoints.controlnet_files import ControlNetFile, write_controlnet
    from marble.checkpoints.resolve import load_model
    from marble.pipeline import Pipeline
    from marble.train.controlnet import initial_controlnet
    loaded = load_model("tiny-random")
    net = initial_controlnet(loaded.model, seed=0)
    state = {k: v.half() for k, v in net.state_dict().items()}
    path = write_controlnet(ControlNetFile(net.config, state, tmp_path, "", "marble"), tmp_path / "cn.safetensors",
                            "marble", {"base_model_hash": loaded.hash})
    pipe = Pipeline(loaded)
    scene, caption = sample_scene("heldout", 0, 0, 64)
    spec = ControlSpec(image=sketch(scene), model=str(path), is_path=True)
    a = pipe.generate_image(caption, seed=1, steps=3, controls=(spec,))
    b = pipe.generate_image(caption, seed=1, steps=3)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_tiny_run_writes_a_self_describing_file_and_resumes_exactly(tmp_path, stop_after_checkpoint):
    from marble.checkpoints.controlnet_files import read_controlnet
    from marble.checkpoints.resolve import load_model
    from marble.tensor_file import read_header
    straight = train(write_config(tmp_path, "straight"))
    base = load_model("tiny-random")
    meta = read_header(straight).metadata
    assert meta["format"] == "marble-controlnet" and meta["base_model_hash"] == base.hash
    assert meta["base_model"] == "tiny-random" and json.loads(meta["training"])["steps"] == 4
    cn = read_controlnet(straight, unet=base.model.config.unet)
    assert all(v.dtype == torch.float16 for v in cn.state.values())
    assert any(cn.state[k].any() for k in cn.state if k.startswith("zero_convs.")), "the zero convs learned"
    assert (tmp_path / "straight" / "samples" / "final.png").exists()

    cfg = write_config(tmp_path, "killed")
    stop_after_checkpoint(lambda: train(cfg), 2)
    assert not (tmp_path / "killed" / "controlnet.safetensors").exists()
    resumed = train(cfg, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    assert same_tensors(a["model"], b["model"]) and same_tensors(a["ema"]["shadow"], b["ema"]["shadow"])
    assert same_tensors(load_file(straight), load_file(resumed))
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


BAD = [
    ('base = "tiny-random"', 'base = "no-such-model"', "no model named"),
    ('base = "tiny-random"', 'base = "tiny-random"\nunet = "tiny"', "unknown keys in model"),
    ('world = "shapes"', 'folder = "/tmp"', "shapes world"),
    ('base = "tiny-random"', 'base = "tiny-random"\nregions = -1', "model.regions must be"),
    ('base = "tiny-random"', 'base = "tiny-random"\nregions = "yes"', "model.regions must be"),
]


@pytest.mark.parametrize("old, new, message", BAD)
def test_bad_configs_exit_2_with_one_line(tmp_path, old, new, message):
    cfg = write_config(tmp_path, "bad", steps=2)
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new, 1))
    p = marble_cli("train", "controlnet", cfg)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad" / "controlnet.safetensors").exists()


# --- eval --control sketch -------------------------------------------------------------------------

def test_eval_with_a_no_op_controlnet_reports_both_columns_equal(tmp_path):
    """The initial ControlNet changes nothing, so with and without it every verdict is the same."""
    from marble.checkpoints.controlnet_files import ControlNetFile, write_controlnet
    from marble.checkpoints.resolve import load_model
    from marble.train.controlnet import initial_controlnet
    loaded = load_model("tiny-random")
    net = initial_controlnet(loaded.model, seed=0)
    path = write_controlnet(ControlNetFile(net.config, net.state_dict(), tmp_path, "", "marble"),
                            tmp_path / "cn.safetensors", "marble", {"base_model_hash": loaded.hash})
    out = tmp_path / "eval.json"
    sheet = tmp_path / "sheet.png"
    p = marble_cli("eval", "--model", "tiny-random", "--split", "heldout", "--prompts", "6", "--steps", "2",
                   "--control", "sketch", "--control-model", path, "--json", out, "--sheet", sheet)
    assert p.returncode == 0, p.stderr[-2000:]
    # the sheet pairs each of the 6 results with its sketch: 12 tiles, 8 a row, so two rows,
    # the first tile an input (grey frame) holding the first prompt's sketch
    from marble.data.scene import Scene
    from marble.eval.sheet import BORDER, FAIL, INPUT, PASS
    img = Image.open(sheet).convert("RGB")
    cell_w = 128 + 2 * BORDER
    assert img.width == 8 * cell_w and img.getpixel((1, 1)) == INPUT and img.getpixel((cell_w + 1, 1)) in (PASS, FAIL)
    report = json.loads(out.read_text())
    assert report["control"] == "sketch" and report["control_model"]["base_model_hash"] == loaded.hash
    with_c, without = report["with_control"], report["without_control"]
    assert with_c["images"] == without["images"] == 6
    assert set(report["side_by_side"]) == set(with_c["categories"]) | {"overall"}
    assert {"position", "counting", "color_attr"} <= set(report["bar"])
    strip = lambda r: [row["images"] for row in r["prompts"]]  # noqa: E731
    assert strip(with_c) == strip(without)
    assert all(r["with"] == r["without"] for r in report["side_by_side"].values())
    assert set(report["scenes"]) == {row["prompt"] for row in with_c["prompts"]}
    first = with_c["prompts"][0]["prompt"]
    scene = Scene.from_dict(report["scenes"][first])
    drawn = sketch(scene, scene.size).resize((128, 128), Image.NEAREST)
    assert img.crop((BORDER, BORDER, BORDER + 128, BORDER + 128)).tobytes() == drawn.convert("RGB").tobytes()
    assert "with ControlNet" in p.stdout


@pytest.mark.parametrize("args, message", [
    (["--control", "sketch", "--control-model", "/nonexistent/cn.safetensors"], "no such file"),
    (["--control", "sketch"], "no ControlNet at"),
    (["--control", "depth"], "--control must be one of"),
    (["--control-model", "x.safetensors"], "needs --control sketch"),
])
def test_eval_refuses_a_missing_control_model_with_one_line(tmp_path, args, message):
    p = marble_cli("eval", "--model", "tiny-random", *args, "--json", tmp_path / "out.json",
                   env_extra={"MARBLE_MODELS": str(tmp_path / "empty")})
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "out.json").exists()


# --- training under regions (model.regions) ----------------------------------------------------------

def test_training_regions_are_the_ones_sampling_reads_from_the_sketch():
    """The trainer's regions (cached palette indices + the caption's phrases) equal what
    `--regions` reads at sampling from the sketch image and the caption (sketch_regions)."""
    from marble.adapters.regions import phrase_regions, sketch_regions
    from marble.checkpoints.resolve import load_model
    from marble.train.controlnet import index_masks
    text = load_model("builtin").model.text_encoder
    bound = 0
    for i in range(40):
        scene, caption = sample_scene("train", 0, i, 64)
        got = phrase_regions(index_masks(torch.from_numpy(sketch_indices(scene, 64))), caption, text.count_tokens,
                             text.max_tokens)
        want = sketch_regions(sketch(scene, 64), caption, text.count_tokens, text.max_tokens)
        assert [(r.color, r.tokens) for r in got] == [(r.color, r.tokens) for r in want], caption
        assert all(torch.equal(a.mask, b.mask) for a, b in zip(got, want))
        bound += len(got)
    assert bound > 40


def test_row_modulation_is_each_rows_own_modulation():
    """Rows with regions of their own (a training batch) modulate as each row alone would, and a
    row without regions is untouched."""
    from marble.adapters.regions import Region, modulation, row_modulation
    g = torch.Generator().manual_seed(0)
    rows = [[Region("red", (torch.rand(4, 4, generator=g) > 0.5).float(), (1, 2))],
            [Region("blue", (torch.rand(4, 4, generator=g) > 0.5).float(), (3,)),
             Region("green", (torch.rand(4, 4, generator=g) > 0.5).float(), (4, 5))],
            []]
    scale = torch.tensor([0.3, 0.8, 0.5])
    for n in (16, 4):
        scores = torch.randn(3, 2, n, 6, generator=g)
        out = row_modulation(rows, (4, 4))(scores, scale)
        for i, regions in enumerate(rows):
            alone = modulation(regions, (4, 4))(scores[i:i + 1], scale[i:i + 1])
            assert torch.allclose(out[i:i + 1], alone, atol=1e-6, rtol=0)
        assert torch.equal(out[2], scores[2])


def test_a_tiny_run_under_regions_records_them_and_resumes_exactly(tmp_path, stop_after_checkpoint):
    """model.regions trains the ControlNet under the modulation: a different loss from the same
    draws without it, the setting in the file's metadata, and --resume still exact."""
    def config(name):
        path = write_config(tmp_path, name, steps=3)
        path.write_text(path.read_text().replace('base = "tiny-random"', 'base = "tiny-random"\nregions = 1.0'))
        return path
    straight = train(config("regions"))
    plain = train(write_config(tmp_path, "plain", steps=3))
    assert json.loads(read_header_meta(straight)["training"])["regions"] == 1.0
    assert "regions" not in json.loads(read_header_meta(plain)["training"])
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "loss.jsonl").read_text().splitlines()]
              for run in ("regions", "plain")]
    assert losses[0] != losses[1]
    cfg = config("killed")
    stop_after_checkpoint(lambda: train(cfg), 2)
    assert same_tensors(load_file(straight), load_file(train(cfg, resume=True)))


def read_header_meta(path):
    from marble.tensor_file import read_header
    return read_header(path).metadata
