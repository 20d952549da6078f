"""`marble train vae`: fit the KL autoencoder to the training images.

model table: {"preset": NAME} and/or VAEConfig fields, plus "kl_weight". Output:
run_dir/vae.safetensors (EMA weights, config in the metadata), which a diffusion recipe names as
`model.vae`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from marble.checkpoints.marble_format import write_vae
from marble.config import config_from_dict, config_to_dict
from marble.models.vae import VAE_PRESETS, AutoencoderKL, VAEConfig
from marble.train.config import ConfigError, TrainConfig
from marble.train.data import batch_indices, load_captioned, pixels_from_uint8
from marble.train.distributed import World, shard
from marble.train.loop import TrainLoop
from marble.train.objective import vae_loss


def vae_config(model: dict) -> VAEConfig:
    fields = {k: v for k, v in model.items() if k not in ("preset", "kl_weight")}
    preset = model.get("preset")
    if preset is not None and preset not in VAE_PRESETS:
        raise ConfigError(f"unknown VAE preset {preset!r}; choose from {', '.join(VAE_PRESETS)}")
    return config_from_dict(VAEConfig, {**(config_to_dict(VAE_PRESETS[preset]) if preset else {}), **fields}, "model")


def train_vae(cfg: TrainConfig, world: World, resume: bool = False) -> Path:
    run_dir = Path(cfg.run_dir)
    data = load_captioned(cfg.data)
    config = vae_config(cfg.model)
    kl_weight = float(cfg.model.get("kl_weight", 1e-6))
    torch.manual_seed(cfg.seed)
    loop = TrainLoop(cfg, AutoencoderKL(config), world, run_dir)
    if resume:
        loop.resume()
    side = cfg.data.size // config.downsampling_factor

    def step_loss(net, step, gen):
        idx = batch_indices(len(data), cfg.batch, step, cfg.seed)
        eps = torch.randn(cfg.batch, config.z_channels, side, side, generator=gen)
        pixels = pixels_from_uint8(data.images[shard(idx, world)]).to(world.device)
        return vae_loss(net, pixels, torch.stack(shard(list(eps), world)).to(world.device), kl_weight)

    loop.fit(step_loss)
    out = run_dir / "vae.safetensors"
    if world.is_main and not out.exists():
        vae = loop.ema_module(lambda: AutoencoderKL(config)).eval()
        write_vae(with_unit_latents(vae, data), out)
    return out


@torch.inference_mode()
def with_unit_latents(vae: AutoencoderKL, data, n: int = 2048) -> AutoencoderKL:
    """Set scaling_factor = 1 / std of the latents (shift 0), as SD's 0.18215 was chosen, so the
    diffusion model sees latents of unit variance and sigma_max means what the schedule says."""
    pixels = pixels_from_uint8(data.images[:n])
    mean = torch.cat([vae.posterior(pixels[i:i + 256])[0] for i in range(0, len(pixels), 256)])
    vae.config = replace(vae.config, scaling_factor=float(1.0 / mean.std()), shift_factor=0.0)
    return vae
