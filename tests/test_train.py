"""The trainer: exact resume after SIGKILL, DDP equals single-process, atomic outputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from marble.train.checkpoint import load_checkpoint

CONFIG = """
kind = "diffusion"
run_dir = "{run_dir}"
steps = {steps}
batch = 4
seed = 3
checkpoint_every = {every}
log_every = 1
threads = 1
ema_decay = 0.9

[model]
name = "test"
unet = {{preset = "tiny"}}
vae = {{preset = "tiny", seed = 0}}
text = {{preset = "clip-tiny"}}
prediction = "v"

[data]
folder = "{folder}"
size = 16
caption_dropout = 0.25

[optim]
lr = 1e-3
warmup = 2
"""

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}


def make_folder(root: Path, n: int = 12) -> Path:
    """A user's own captioned image folder in the common layout (metadata.jsonl)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name, rgb = list(COLORS.items())[i % len(COLORS)]
        img = np.full((16, 16, 3), 240, np.uint8)
        y, x = rng.integers(0, 8, 2)
        img[y:y + 8, x:x + 8] = rgb
        Image.fromarray(img).save(root / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": f"a {name} square"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_config(tmp: Path, name: str, folder: Path, steps: int = 10, every: int = 2) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(CONFIG.format(run_dir=tmp / name, steps=steps, every=every, folder=folder))
    return path


def marble(*args, env_extra=None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "marble", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> str:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    return out


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_sigkill_ends_at_the_same_weights(tmp_path, sigkill_after_checkpoint):
    folder = make_folder(tmp_path / "data")
    finish(marble("train", "diffusion", write_config(tmp_path, "straight", folder)))

    cfg = write_config(tmp_path, "killed", folder)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    sigkill_after_checkpoint(("train", "diffusion", cfg), ckpt, 4)   # killed once it has checkpointed mid-way
    killed_at = load_checkpoint(ckpt)["step"]
    assert killed_at < 10, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    load_checkpoint(ckpt)  # whatever the moment of the kill, the checkpoint is whole

    finish(marble("train", "diffusion", cfg, "--resume"))
    assert not [f for f in os.listdir(tmp_path / "killed") if f.endswith(".tmp")]
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(ckpt)
    assert a["step"] == b["step"] == 10
    assert same_tensors(a["model"], b["model"])
    assert same_tensors(a["ema"]["shadow"], b["ema"]["shadow"])
    assert same_tensors(load_file(tmp_path / "straight" / "model.safetensors"),
                        load_file(tmp_path / "killed" / "model.safetensors"))
    # the loss log has each step once, as if never interrupted
    log = [json.loads(line) for line in (tmp_path / "killed" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11))
    # the time column is the run's training time summed over both segments: it never goes back
    times = [r["time"] for r in log]
    assert times == sorted(times) and b["seconds"] >= times[-1] > 0
    assert (tmp_path / "killed" / "loss.png").exists()


def test_a_second_run_in_the_same_dir_needs_resume(tmp_path):
    folder = make_folder(tmp_path / "data")
    cfg = write_config(tmp_path, "run", folder, steps=2)
    finish(marble("train", "diffusion", cfg))
    p = marble("train", "diffusion", cfg)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "--resume" in err and "Traceback" not in err


@pytest.mark.slow   # a subprocess training run or more (~25 s); CI runs it in `make test-slow`
def test_resume_accepts_a_checkpoint_from_before_a_config_key_existed(tmp_path):
    from marble.train.checkpoint import save_checkpoint
    folder = make_folder(tmp_path / "data")
    finish(marble("train", "diffusion", write_config(tmp_path, "run", folder, steps=2)))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    old = json.loads(state["config"])
    del old["data"]["kinds"]                       # written before data.kinds was added
    save_checkpoint({**state, "config": json.dumps(old)}, ckpt)
    finish(marble("train", "diffusion", write_config(tmp_path, "run", folder, steps=3), "--resume"))
    assert load_checkpoint(ckpt)["step"] == 3
    # a data table that really differs is still refused
    changed = write_config(tmp_path, "run", folder, steps=4)
    changed.write_text(changed.read_text().replace("caption_dropout = 0.25", "caption_dropout = 0.5"))
    p = marble("train", "diffusion", changed, "--resume")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "different 'data'" in err and "Traceback" not in err


@pytest.mark.slow   # a subprocess training run or more (~25 s); CI runs it in `make test-slow`
def test_ddp_with_two_processes_equals_single_process(tmp_path):
    """Same global batch of 4: 2 ranks x 2 vs 1 x 4. Gradients differ only by float summation order
    (the all-reduce averages two half-batch means, ~1e-7 relative). Adam divides by sqrt(v), so a
    weight whose gradient is tiny can move by up to ~lr·(relative gradient error); over 4 steps at
    lr 1e-3 the measured worst weight difference is 3e-6. The bound 1e-5 is 3x that, and far
    below the 1e-3-per-step scale of a real divergence (a wrong shard or a missing all-reduce)."""
    folder = make_folder(tmp_path / "data")
    finish(marble("train", "diffusion", write_config(tmp_path, "single", folder, steps=4, every=4)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29500 + os.getpid() % 1000), "-m", "marble", "train", "diffusion",
                        str(write_config(tmp_path, "ddp", folder, steps=4, every=4))],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_file(tmp_path / "single" / "model.safetensors")
    b = load_file(tmp_path / "ddp" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"DDP vs single-process max abs difference: {worst:.3g}")
    assert worst < 1e-5, worst


FINE_TUNE = """
kind = "diffusion"
run_dir = "{run_dir}"
steps = 2
batch = 4
threads = 1

[model]
init = "{init}"
name = "{name}"
{unet}

[data]
folder = "{folder}"
size = 16

[optim]
lr = 0.0
warmup = 0
"""


@pytest.mark.slow   # a subprocess training run or more (~25 s); CI runs it in `make test-slow`
def test_fine_tuning_starts_from_the_init_model(tmp_path):
    from marble.tensor_file import read_header

    def read_metadata(path):
        return read_header(path).metadata
    folder = make_folder(tmp_path / "data")
    finish(marble("train", "diffusion", write_config(tmp_path, "base", folder, steps=2)))
    base = tmp_path / "base" / "model.safetensors"
    base_config = json.loads(read_metadata(base)["config"])
    cfg = tmp_path / "tuned.toml"
    cfg.write_text(FINE_TUNE.format(run_dir=tmp_path / "tuned", init=base, name="tuned", unet="", folder=folder))
    finish(marble("train", "diffusion", cfg))
    out = tmp_path / "tuned" / "model.safetensors"
    # learning rate 0: the result is exactly the init (U-Net, its VAE and its text encoder), and it
    # inherits the init's U-Net shape, prediction, schedule and defaults
    a, b = load_file(base), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads(read_metadata(out)["config"])
    assert config == {**base_config, "name": "tuned"}
    # and with a learning rate it moves away from it
    cfg = tmp_path / "moved.toml"
    cfg.write_text(FINE_TUNE.format(run_dir=tmp_path / "moved", init=base, name="moved", unet="", folder=folder)
                   .replace("lr = 0.0", "lr = 1e-3"))
    finish(marble("train", "diffusion", cfg))
    c = load_file(tmp_path / "moved" / "model.safetensors")
    assert not torch.equal(a["unet.out.2.weight"], c["unet.out.2.weight"])
    assert all(torch.equal(a[k], c[k]) for k in a if not k.startswith("unet."))   # VAE, text encoder frozen
    # a U-Net of another shape cannot start from it
    cfg = tmp_path / "bad.toml"
    cfg.write_text(FINE_TUNE.format(run_dir=tmp_path / "bad", init=base, name="bad", folder=folder,
                                    unet='unet = {preset = "tiny", model_channels = 16}'))
    p = marble("train", "diffusion", cfg)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "differs from model.init" in err and "Traceback" not in err


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.toml")),
                         ids=lambda p: p.name)
def test_committed_configs_load_and_name_only_known_keys(path):
    from marble.train.config import load_config
    from marble.train.diffusion import check_keys
    from marble.train.vae import vae_config
    cfg = load_config(path)
    if cfg.kind == "vae":
        vae_config(cfg.model)
    elif cfg.kind == "lora":   # a registered model name or a path from the repo root
        from marble.checkpoints.resolve import NAMED
        from marble.train.lora import MODEL_KEYS
        assert set(cfg.model) <= MODEL_KEYS
        init = cfg.model["init"]
        assert init == "builtin" or init in NAMED or (Path(__file__).resolve().parents[1] / init).is_file()
    elif cfg.kind == "lcm":     # the teacher: builtin or a path from the repo root
        from marble.train.lcm import check_model_table
        check_model_table(cfg.model)
        init = cfg.model["init"]
        assert init == "builtin" or (Path(__file__).resolve().parents[1] / init).is_file()
    elif cfg.kind == "controlnet":   # the frozen base: builtin or a path from the repo root
        from marble.train.controlnet import check_model_table
        check_model_table(cfg.model)
        base = cfg.model.get("base", "builtin")
        assert base == "builtin" or (Path(__file__).resolve().parents[1] / base).is_file()
    else:
        check_keys(cfg.model, "init" in cfg.model)
        if "init" in cfg.model:
            assert (Path(__file__).resolve().parents[1] / cfg.model["init"]).is_file()   # paths are from the repo root


def test_data_kinds_mix_the_shapes_world_and_are_refused_elsewhere(tmp_path):
    from marble.data.shapes import sample_scene
    from marble.train.config import ConfigError, DataConfig
    from marble.train.data import load_captioned
    data = load_captioned(DataConfig(n=6, size=32, kinds={"relation": 1}))
    assert data.captions == [sample_scene("train", 0, i, 32, (0, 0, 0, 1))[1] for i in range(6)]
    assert tuple(data.images.shape) == (6, 3, 32, 32)
    with pytest.raises(ConfigError, match="data.kinds: unknown scene kinds"):
        load_captioned(DataConfig(n=2, kinds={"relations": 1}))
    with pytest.raises(ConfigError, match="image folder has none"):
        load_captioned(DataConfig(world=None, folder=str(tmp_path), kinds={"relation": 1}))
