"""Candidate (b) of the built-in model v2 (issue 20): the MMDiT transformer denoiser
(marble/models/mmdit.py) trained by rectified flow. It must satisfy the denoiser contract, round-trip
through its self-describing file, learn, and work with every sampler and mode unchanged."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from marble.config import config_from_dict, config_to_dict
from marble.diffusion.denoiser import FLOW_TIME_SCALE, add_noise, flow_denoiser, flow_sigma, flow_t
from marble.diffusion.schedule import make_schedule
from marble.errors import ConfigError
from marble.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig, tiny_config
from marble.models.mmdit import MMDIT_PRESETS, MMDiT, MMDiTConfig
from marble.models.unet import UNetConfig
from marble.train.objective import flow_loss, logit_normal_t

TINY = MMDIT_PRESETS["tiny"]


def random_net(config=TINY, seed=0) -> MMDiT:
    """adaLN-Zero starts as the zero function: fill every weight so the tests see a real network."""
    torch.manual_seed(seed)
    net = MMDiT(config).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.2)
    return net


def flow_model(seed=0) -> LatentDiffusion:
    config = tiny_config().replace(name="tiny-mmdit", unet=TINY, prediction="flow",
                                   schedule={"name": "flow", "n": 1000, "shift": 1.0},
                                   default_sampler="Euler", default_steps=4, default_cfg=3.0)
    torch.manual_seed(seed)
    model = LatentDiffusion(config).eval()
    for p in model.unet.parameters():
        p.data.normal_(0, 0.2)
    return model


# --- the network -------------------------------------------------------------------------------

def test_starts_as_zero_and_maps_latents_to_latents():
    torch.manual_seed(0)
    fresh = MMDiT(TINY)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    assert torch.equal(fresh(x, torch.tensor([1.0, 900.0]), ctx), torch.zeros(2, 4, 8, 8))   # adaLN-Zero
    net = random_net()
    out = net(x, torch.tensor([1.0, 900.0]), ctx)
    assert out.shape == (2, 4, 8, 8) and out.abs().min() > 0
    odd = net(torch.randn(1, 4, 7, 9), torch.tensor([3.0]), ctx[:1])                       # padded, cropped back
    assert odd.shape == (1, 4, 7, 9)
    with pytest.raises(ValueError, match="no extra input"):
        net(x, torch.tensor([1.0, 2.0]), ctx, y=torch.zeros(2, 3))


def test_batch_items_are_independent_and_time_broadcasts():
    """The CFG batch [uncond; cond] equals two separate calls; a 0-d time serves the whole batch."""
    net = random_net()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        both = net(x, torch.tensor([10.0, 700.0]), ctx)
        one = torch.cat([net(x[:1], torch.tensor([10.0]), ctx[:1]), net(x[1:], torch.tensor([700.0]), ctx[1:])])
        shared = net(x, torch.tensor(10.0), ctx)
    assert torch.allclose(both, one, atol=1e-5)
    assert torch.allclose(shared[0], both[0], atol=1e-5) and not torch.allclose(shared[1], both[1], atol=1e-3)


def test_the_image_tokens_know_their_place():
    """A constant latent gives different outputs per patch only through the position code."""
    net = random_net()
    with torch.no_grad():
        out = net(torch.ones(1, 4, 8, 8), torch.tensor([500.0]), torch.zeros(1, 3, 32))
    patches = out[0].unfold(1, 2, 2).unfold(2, 2, 2).reshape(4, 16, 4)
    assert (patches - patches[:, :1]).abs().max() > 1e-3


# --- the denoiser contract ---------------------------------------------------------------------

def test_flow_time_and_sigma_are_inverse_and_match_the_forward_process():
    t = torch.tensor([0.001, 0.25, 0.5, 0.9, 0.999], dtype=torch.float64)
    assert torch.allclose(flow_t(flow_sigma(t)), t, rtol=0, atol=1e-12)
    x0, eps = torch.randn(5, 4, 2, 2, dtype=torch.float64), torch.randn(5, 4, 2, 2, dtype=torch.float64)
    x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    assert torch.allclose(add_noise(x0, flow_sigma(t), eps) / (1 + flow_sigma(t))[:, None, None, None], x_t, rtol=0, atol=1e-12)


def test_a_perfect_velocity_gives_the_exact_x0_at_every_sigma():
    """An oracle network that knows x0 returns the true velocity from what it is given (x_t and
    1000·t); the wrapper must then return x0 whatever σ, per item or shared."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)

    def oracle(x_t, time, context=None):
        t = (time / FLOW_TIME_SCALE).to(x_t.dtype)[:, None, None, None]
        return (x_t - x0) / t                     # x_t = (1 − t)·x0 + t·eps  ⇒  eps − x0 = (x_t − x0)/t

    D = flow_denoiser(oracle)
    sigma = torch.tensor([0.01, 1.0, 4000.0], dtype=torch.float64)
    assert torch.allclose(D(add_noise(x0, sigma, eps), sigma), x0, rtol=0, atol=1e-9)
    assert torch.allclose(D(add_noise(x0, 2.5, eps), 2.5), x0, rtol=0, atol=1e-9)


def test_flow_schedule_is_uniform_in_t_and_shifts_toward_noise():
    s = make_schedule("flow", 1000)
    t = flow_t(s.sigmas)
    assert torch.allclose(t[:-1], torch.arange(1, 1000, dtype=torch.float64) / 1000, rtol=0, atol=1e-12)
    assert s.sigma_max == 4096.0 and abs(s.sigma_min - 1 / 999) < 1e-12
    shifted = flow_t(make_schedule("flow", 1000, shift=3.0).sigmas)
    assert shifted[499] == pytest.approx(0.75)                 # SD3 eq. 23: 3·0.5/(1 + 2·0.5)
    with pytest.raises(ValueError, match="together"):
        tiny_config().replace(prediction="flow")


# --- the file ------------------------------------------------------------------------------------

def test_round_trips_through_its_file_bit_exactly(tmp_path):
    from marble.checkpoints.checkpoint import from_model, to_model
    from marble.checkpoints.marble_format import read_marble, write_marble
    model = flow_model()
    path = write_marble(from_model(model), tmp_path / "m.safetensors")
    back = to_model(read_marble(path))
    assert back.config == model.config and isinstance(back.config.unet, MMDiTConfig)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, ctx, sigma = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.tensor([0.5, 20.0])
    with torch.no_grad():
        assert torch.equal(model.denoiser(x, sigma, context=ctx), back.denoiser(x, sigma, context=ctx))


def test_network_config_union_reads_by_kind():
    unet = config_to_dict(UNetConfig())
    assert "kind" not in unet and isinstance(config_from_dict(LatentDiffusionConfig, {
        **config_to_dict(tiny_config())}).unet, UNetConfig)                 # files from before the union
    d = config_to_dict(tiny_config().replace(unet=TINY, prediction="flow", schedule={"name": "flow"}))
    assert d["unet"]["kind"] == "mmdit" and config_from_dict(LatentDiffusionConfig, d).unet == TINY
    with pytest.raises(ConfigError, match="kind 'dit'"):
        config_from_dict(LatentDiffusionConfig, {**d, "unet": {**d["unet"], "kind": "dit"}})


# --- training ------------------------------------------------------------------------------------

def test_a_few_flow_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    net = MMDiT(TINY)
    g = torch.Generator().manual_seed(0)
    x0, ctx = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 5, 32, generator=g)
    t, eps = logit_normal_t(torch.randn(8, generator=g)), torch.randn(8, 4, 8, 8, generator=g)
    assert 0 < t.min() and t.max() < 1
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = flow_loss(net, x0, ctx, t, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # at the start the network is zero, so the loss is E|eps − x0|² = 2 exactly in expectation
    assert abs(losses[0] - float(((eps - x0) ** 2).mean())) < 1e-6
    assert losses[-1] < 0.7 * losses[0]


# --- sampling ------------------------------------------------------------------------------------

def test_every_sampler_and_mode_runs_through_the_pipeline():
    from PIL import Image

    from marble.checkpoints.resolve import LoadedModel
    from marble.diffusion.samplers import SAMPLERS
    from marble.pipeline import Pipeline
    pipe = Pipeline(LoadedModel(flow_model(), "tiny-mmdit", "test"))
    firsts = {}
    for name in SAMPLERS:
        a = pipe.generate_image("a red circle", seed=1, sampler=name, steps=3, width=32, height=32)
        b = pipe.generate_image("a red circle", seed=1, sampler=name, steps=3, width=32, height=32)
        assert a.size == (32, 32) and a.tobytes() == b.tobytes()          # seeded, deterministic
        firsts[name] = a.tobytes()
    assert len(set(firsts.values())) > len(SAMPLERS) // 2                   # the samplers differ
    init = Image.new("RGB", (32, 32), (200, 40, 40))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    from marble.request import GenerationRequest, resolve
    for req in (GenerationRequest(prompt="a blue square", seed=2, steps=4, width=32, height=32, init_image=init,
                                  strength=0.5),
                GenerationRequest(prompt="a blue square", seed=2, steps=4, width=32, height=32, init_image=init,
                                  mask=mask, strength=1.0)):
        image = pipe.generate(resolve(req, pipe.defaults)).images[0]
        assert image.size == (32, 32)
    # inpainting keeps the unmasked half exactly
    right = image.crop((16, 0, 32, 32))
    assert right.tobytes() == init.crop((16, 0, 32, 32)).tobytes()


def test_marble_train_diffusion_trains_an_mmdit_by_rectified_flow(tmp_path):
    """`marble train diffusion` from a config naming kind = "mmdit" and prediction = "flow":
    the file it writes is a flow MMDiT that loads; min_snr_gamma is refused for flow."""
    import os

    from test_train import CONFIG, make_folder
    folder = make_folder(tmp_path / "data")
    text = CONFIG.format(run_dir=tmp_path / "run", steps=3, every=3, folder=folder).replace(
        'unet = {preset = "tiny"}', 'unet = {kind = "mmdit", preset = "tiny"}').replace(
        'prediction = "v"', 'prediction = "flow"\nschedule = {name = "flow", shift = 1.0}')
    cfg = tmp_path / "mmdit.toml"
    cfg.write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "marble", "train", "diffusion", str(cfg)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from marble.checkpoints.checkpoint import to_model
    from marble.checkpoints.marble_format import read_marble
    model = to_model(read_marble(tmp_path / "run" / "model.safetensors"))
    assert isinstance(model.unet, MMDiT) and model.config.prediction == "flow"
    assert any(p.abs().sum() > 0 for p in model.unet.final.parameters())       # trained off its zero start
    # EMA snapshots along the way (learning curves) leave the training itself untouched
    snap = tmp_path / "snap.toml"
    snap.write_text(text.replace(str(tmp_path / "run"), str(tmp_path / "snap")).replace(
        'prediction = "flow"', 'prediction = "flow"\nsnapshot_every = 2'))
    r = subprocess.run([sys.executable, "-m", "marble", "train", "diffusion", str(snap)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "snap" / "snapshots").iterdir()) == ["step-000002.safetensors"]
    at_2 = read_marble(tmp_path / "snap" / "snapshots" / "step-000002.safetensors")
    final, with_snaps = read_marble(tmp_path / "run" / "model.safetensors"), read_marble(tmp_path / "snap" / "model.safetensors")
    assert final.state.keys() == with_snaps.state.keys()
    assert all(torch.equal(final.state[k], with_snaps.state[k]) for k in final.state)
    assert at_2.config == final.config and not all(torch.equal(at_2.state[k], final.state[k]) for k in final.state)
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(str(tmp_path / "run"), str(tmp_path / "bad")).replace(
        'prediction = "flow"', 'prediction = "flow"\nmin_snr_gamma = 5.0'))
    r = subprocess.run([sys.executable, "-m", "marble", "train", "diffusion", str(bad)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "min_snr_gamma" in r.stderr and "Traceback" not in r.stderr


def test_diffusers_export_refuses_an_mmdit(tmp_path):
    from marble.checkpoints.checkpoint import from_model
    from marble.checkpoints.diffusers_folder import write_diffusers
    with pytest.raises(ValueError, match="not a U-Net"):
        write_diffusers(from_model(flow_model()), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lora_training_refuses_a_flow_mmdit_with_one_error(tmp_path):
    """LoRA training (marble/train/lora.py) is written for U-Nets on discrete timesteps."""
    from marble.checkpoints.checkpoint import from_model
    from marble.checkpoints.marble_format import write_marble
    from marble.train.config import load_config
    from marble.train.distributed import init_world
    from marble.train.lora import train_lora
    base = write_marble(from_model(flow_model()), tmp_path / "mmdit.safetensors")
    from test_train import make_folder
    folder = make_folder(tmp_path / "data")
    cfg = tmp_path / "lora.toml"
    cfg.write_text(f'kind = "lora"\nrun_dir = "{tmp_path / "run"}"\nsteps = 2\nbatch = 2\n[model]\ninit = "{base}"\n'
                   f'[data]\nfolder = "{folder}"\nsize = 16\n[lora]\nrank = 2\n')
    with pytest.raises(ConfigError, match="LoRA training needs a U-Net model.*MMDiT with prediction 'flow'"):
        train_lora(load_config(cfg, {"kind": "lora"}), init_world(), False)
