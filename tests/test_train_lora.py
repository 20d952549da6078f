"""`marble train lora`: it learns, the file is kohya's (diffusers loads it to the same U-Net and text
encoder), resume is exact, the frozen base is untouched and never checkpointed, bad configs exit 2."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from marble.adapters.lora import LoraUse, overlay
from marble.adapters.lora_files import read_lora
from marble.adapters.lora_table import module_table
from marble.checkpoints.resolve import load_model
from marble.data.shapes import render_dataset
from marble.train.checkpoint import load_checkpoint
from marble.train.config import load_config
from marble.train.distributed import init_world
from marble.train.objective import diffusion_loss

CONFIG = """
kind = "lora"
run_dir = "{run_dir}"
steps = {steps}
batch = 4
seed = 1
ema_decay = 0.5
log_every = 1
checkpoint_every = 2
threads = 1

[model]
init = "{init}"

[data]
folder = "{folder}"
size = {size}
caption_dropout = 0.25

[lora]
rank = 4
alpha = {alpha}
targets = {targets}
snapshot_every = 3
sample_prompts = ["a red heart"]

[optim]
lr = {lr}
warmup = 1
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Eight `concept` scenes (hearts) as a user's image folder."""
    root = tmp_path_factory.mktemp("hearts")
    images, captions = render_dataset(8, split="concept", seed=0, size=32)
    lines = []
    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray(image).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_config(tmp_path, name, folder, *, steps=6, init="tiny-random", size=32, alpha=8.0,
                 targets='["attention", "conv"]', lr=5e-3, extra=""):
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(run_dir=tmp_path / name, steps=steps, init=init, folder=folder, size=size,
                                  alpha=alpha, targets=targets, lr=lr) + extra)
    return path


def train(config_path, resume=False):
    from marble.train.lora import train_lora
    torch.set_num_threads(1)
    return train_lora(load_config(config_path, {"kind": "lora"}), init_world(), resume)


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def fixed_loss(model, latents, states, seed=0, draws=4):
    """The diffusion loss on fixed timesteps and noise: a number that only the weights change."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        t = torch.randint(0, model.schedule.num_timesteps, (len(latents),), generator=g)
        eps = torch.randn(latents.shape, generator=g)
        total += float(diffusion_loss(model.unet, model.schedule, model.config.prediction, latents, states, t, eps))
    return total / draws


def test_a_tiny_run_learns_and_leaves_the_base_untouched(folder, tmp_path, monkeypatch):
    import marble.train.lora as trainer
    seen = {}
    real_load = trainer.load_base

    def spy(cfg):
        seen["loaded"] = real_load(cfg)
        seen["before"] = {k: v.clone() for k, v in seen["loaded"].model.state_dict().items()}
        return seen["loaded"]
    monkeypatch.setattr(trainer, "load_base", spy)
    out = train(write_config(tmp_path, "run", folder, steps=30, lr=1e-2))
    # the trained model's own base weights, bit for bit, and no hook left behind
    model = seen["loaded"].model
    assert same_tensors(model.state_dict(), seen["before"])
    assert all(not m._forward_hooks for m in model.modules())
    assert same_tensors(model.state_dict(), load_model("tiny-random").model.state_dict())
    # the checkpoint holds the LoRA and its EMA only, never the frozen base
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["step"] == 30
    assert set(ckpt["model"]) == set(ckpt["ema"]["shadow"])
    assert {k.split(".")[0] for k in ckpt["model"]} == {"down", "up"}
    n_targets = len(module_table(model).select(["attention", "conv"]))
    assert len(ckpt["model"]) == 2 * n_targets
    # it learns: the loss on fixed noise and timesteps falls with the LoRA applied
    base = load_model("tiny-random").model
    lora = read_lora(out, module_table(base))
    latents = load_file(tmp_path / "run" / "cache" / "latents.safetensors")["latents"].float()
    captions = [json.loads(line)["text"] for line in (folder / "metadata.jsonl").read_text().splitlines()]
    states = base.text_encoder.encode(captions)
    before = fixed_loss(base, latents, states)
    with overlay(base, [LoraUse(lora)]):
        after = fixed_loss(base, latents, states)
    assert after < 0.9 * before, (before, after)
    # the file: kohya names and metadata, every layer trained, snapshots along the way
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert all(k.startswith("lora_unet_") for k in keys) and len(keys) == 3 * n_targets
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "8.0" and meta["ss_steps"] == "30" and meta["ss_learning_rate"] == "0.01"
    assert meta["ss_resolution"] == "(32, 32)" and meta["ss_base_model_version"] == "marble:tiny-random"
    assert meta["ss_sd_model_hash"] == seen["loaded"].hash and json.loads(meta["ss_network_args"])["conv_dim"] == "4"
    assert sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir()) == [
        f"step-{s:06d}.safetensors" for s in range(3, 31, 3)]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and (tmp_path / "run" / "loss.png").exists()
    assert (tmp_path / "run" / "samples" / "final.png").exists()


def test_resume_is_exact(folder, tmp_path, stop_after_checkpoint):
    """A run stopped right after its step-4 checkpoint and resumed ends where an uninterrupted one does."""
    straight = train(write_config(tmp_path, "straight", folder, steps=7))
    cfg = write_config(tmp_path, "killed", folder, steps=7)
    stop_after_checkpoint(lambda: train(cfg), 4)
    assert not (tmp_path / "killed" / "lora.safetensors").exists()
    resumed = train(cfg, resume=True)
    a, b = load_checkpoint(tmp_path / "straight" / "checkpoint.pt"), load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert a["step"] == b["step"] == 7
    assert same_tensors(a["model"], b["model"]) and same_tensors(a["ema"]["shadow"], b["ema"]["shadow"])
    assert same_tensors(load_file(straight), load_file(resumed))
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    """A tiny SD1 pipeline folder written by diffusers (as tests/test_lora.py builds it)."""
    from sd_fixtures import (clip_text_kwargs, diffusers_oracle, diffusers_unet_kwargs, diffusers_vae_kwargs,
                             oracle_tokenizer_folder, randomize_)
    diffusers_oracle()
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    root = tmp_path_factory.mktemp("sd1")
    pipe = StableDiffusionPipeline(
        vae=randomize_(AutoencoderKL(**diffusers_vae_kwargs()), seed=2),
        text_encoder=randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_text_kwargs("sd1"))), 3),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(oracle_tokenizer_folder(root / "vocab")),
        unet=randomize_(UNet2DConditionModel(**diffusers_unet_kwargs("sd1")), seed=1),
        scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def test_diffusers_loads_the_trained_file_to_the_same_unet_and_text_encoder(folder, sd_pipe, tmp_path):
    """A LoRA trained on an SD model (attention, LoCon convs and the text encoder, alpha ≠ rank), loaded
    by diffusers' load_lora_weights: U-Net output and text-encoder states equal marble's with the
    same file applied, within 1e-5 relative."""
    from diffusers import StableDiffusionPipeline
    out = train(write_config(tmp_path, "sd", folder, steps=3, init=sd_pipe, alpha=3.0, lr=3e-2,
                             targets='["attention", "conv", "text"]'))
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_te_") for k in keys) and any("resnets" in k for k in keys)
    assert all(float(load_file(out)[k].abs().max()) > 0 for k in keys if k.endswith("lora_up.weight"))

    prompts = ["a red heart", ""]
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 321.5]), torch.randn(2, 77, 32, generator=g)
    model = load_model(str(sd_pipe)).model
    with torch.no_grad(), overlay(model, [LoraUse(read_lora(out, module_table(model)))]):
        ours = model.text_encoder.encode(prompts), model.unet(x, t, context)
    pipe = StableDiffusionPipeline.from_pretrained(sd_pipe, local_files_only=True, safety_checker=None)
    pipe.load_lora_weights(str(out))
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0], pipe.unet(x, t, encoder_hidden_states=context).sample
    for got, want in zip(ours, theirs):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    with torch.no_grad():   # and the LoRA does change both
        base = model.text_encoder.encode(prompts), model.unet(x, t, context)
    assert all((b - o).abs().max() > 1e-4 * o.abs().max() for b, o in zip(base, ours))


def marble_cli(*args):
    return subprocess.run([sys.executable, "-m", "marble", *args], capture_output=True, text=True, timeout=300)


BAD = [
    ("rank = 4", "rank = 0", "lora.rank"),
    ("alpha = 8.0", "alpha = -1.0", "lora.alpha"),
    ('targets = ["attention", "conv"]', 'targets = ["attention", "mlp"]', "lora.targets"),
    ('targets = ["attention", "conv"]', "targets = []", "lora.targets"),
    ("rank = 4", 'rank = "big"', "integers"),
    ("rank = 4", "rank = 4\nwidth = 3", "unknown keys in config.lora"),
    ('init = "tiny-random"', 'init = "no-such-model"', "no model named"),
    ('init = "tiny-random"', 'unet = "tiny"', "model"),
    ('folder = "', 'folder = "/nonexistent', "nonexistent"),
]


@pytest.mark.parametrize("old, new, message", BAD)
def test_bad_configs_exit_2_with_one_line(folder, tmp_path, old, new, message):
    cfg = write_config(tmp_path, "bad", folder, steps=2)
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new, 1))
    p = marble_cli("train", "lora", str(cfg))
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "bad" / "lora.safetensors").exists()


def test_a_lora_table_on_another_kind_and_an_existing_output_are_refused(folder, tmp_path):
    cfg = write_config(tmp_path, "other", folder, steps=2)
    p = marble_cli("train", "diffusion", str(cfg))
    assert p.returncode == 2 and "[lora]" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "lora.safetensors").write_bytes(b"mine")
    p = marble_cli("train", "lora", str(write_config(tmp_path, "taken", folder, steps=2)))
    assert p.returncode == 2 and "never overwrites" in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "taken" / "lora.safetensors").read_bytes() == b"mine"


@pytest.fixture(scope="module")
def random_lora_file(tmp_path_factory):
    """A random attention + conv LoRA for tiny-random, written as marble writes them."""
    from marble.adapters.lora import attach_trainable
    from marble.adapters.lora_files import save_kohya
    model = load_model("tiny-random").model
    trainable = attach_trainable(model, ("attention", "conv"), rank=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for up in trainable.up:
            up.copy_(torch.randn(up.shape, generator=g))
    trainable.detach()
    return save_kohya(tmp_path_factory.mktemp("lora") / "rnd.safetensors", trainable.to_lora("rnd"), module_table(model))


def test_eval_applies_a_lora_and_reports_it(random_lora_file, tmp_path):
    from marble.cli.eval import model_source
    base, _ = model_source("tiny-random", None, 2, None)
    with_lora, extra = model_source("tiny-random", None, 2, None, [f"{random_lora_file}:0.7"])
    assert extra["loras"] == [{"name": "rnd", "hash": read_lora(random_lora_file, module_table(
        load_model("tiny-random").model)).hash, "weight": 0.7, "path": str(random_lora_file)}]
    assert np.abs(np.asarray(base("a red heart", 0), np.int16) - np.asarray(with_lora("a red heart", 0), np.int16)).max() > 0
    again, _ = model_source("tiny-random", None, 2, None, [f"{random_lora_file}:0"])
    assert np.array_equal(np.asarray(again("a red heart", 0)), np.asarray(base("a red heart", 0)))


@pytest.mark.parametrize("arg, message", [("{f}:abc", "not a number"), ("/nonexistent.safetensors", "no such file"),
                                          ("{f}", "another model architecture")])
def test_eval_refuses_a_bad_lora_with_one_line(random_lora_file, tmp_path, arg, message):
    # the third case: a LoRA made for tiny-random, used on the built-in model
    model = "tiny-random" if "arch" not in message else "builtin"
    p = marble_cli("eval", "--model", model, "--prompts", "1", "--steps", "1", "--lora", arg.format(f=random_lora_file),
                   "--json", str(tmp_path / "out.json"))
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "out.json").exists()
    p = marble_cli("eval", "--model", "groundtruth", "--prompts", "1", "--lora", str(random_lora_file),
                   "--json", str(tmp_path / "out.json"))
    assert p.returncode == 2 and "baseline" in p.stderr
