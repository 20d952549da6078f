"""A latent-diffusion model: text encoder + denoising network + VAE codec + the noise schedule
they were trained on.

`LatentDiffusionConfig` is the typed, JSON-serialisable description stored inside model files;
`LatentDiffusion` holds the three networks and wraps the denoising network (a U-Net, or an MMDiT
transformer, both under the name `unet` so every key and tool that reaches it stays the same) into
the denoiser contract: discrete VP timesteps for eps/v/x0 networks, rectified-flow time for "flow".
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from marble.config import config_from_dict, config_to_dict
from marble.diffusion.denoiser import Denoiser, discrete_denoiser, flow_denoiser
from marble.diffusion.few_step import FewStepSettings
from marble.diffusion.schedule import DiscreteSchedule, make_schedule
from marble.models.conditioning import VectorConditioning
from marble.models.mmdit import MMDiT, MMDiTConfig
from marble.models.text import build_text_encoder
from marble.models.unet import UNET_PRESETS, UNet, UNetConfig
from marble.models.vae import VAE_PRESETS, AutoencoderKL, VAEConfig
from marble.models.weight_cast import compute_dtype

PREDICTIONS = ("eps", "v", "x0", "flow")     # flow: rectified-flow velocity eps − x0 on a "flow" schedule


@dataclass(frozen=True)
class LatentDiffusionConfig:
    name: str
    unet: UNetConfig | MMDiTConfig              # the denoising network (MMDiT configs carry kind = "mmdit")
    vae: VAEConfig
    text: dict                                  # text encoder config (see marble.models.text)
    schedule: dict = field(default_factory=lambda: {"name": "scaled_linear", "n": 1000,
                                                    "beta_start": 0.00085, "beta_end": 0.012})
    prediction: str = "eps"                     # what the network predicts: eps | v | x0 | flow
    default_width: int = 512
    default_height: int = 512
    max_pixels: int = 2048 * 2048               # requests above this are refused
    default_steps: int = 20
    default_cfg: float = 7.0
    default_sampler: str = "Euler a"
    vector: VectorConditioning | None = None    # SDXL's vector conditioning y (marble.models.conditioning); None for SD1/SD2
    few_step: FewStepSettings | None = None     # a few-step model's card settings (marble.diffusion.few_step): the
                                                # defaults of its requests, and warnings outside them

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, not {self.prediction!r}")
        if (self.prediction == "flow") != (self.schedule.get("name") == "flow"):
            raise ValueError('prediction "flow" and a "flow" schedule go together, and only together')
        if (self.vector is None) != (not self.unet.adm_in_channels):
            raise ValueError("a U-Net with adm_in_channels needs the vector conditioning that fills it, and only it")

    @property
    def latent_factor(self) -> int:
        return self.vae.downsampling_factor

    def replace(self, **changes) -> "LatentDiffusionConfig":
        """A copy with `changes` (configs or their dict forms), checked like a config read from a file."""
        return config_from_dict(LatentDiffusionConfig, {**config_to_dict(self), **changes}, "model config")


class LatentDiffusion(nn.Module):
    def __init__(self, config: LatentDiffusionConfig, text_encoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.unet = MMDiT(config.unet) if isinstance(config.unet, MMDiTConfig) else UNet(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.text_encoder = text_encoder if text_encoder is not None else build_text_encoder(config.text)
        with torch.device("cpu"):  # real numbers even when the networks are built on the meta device
            self.schedule: DiscreteSchedule = make_schedule(**config.schedule)
        self.denoiser = self.denoiser_for(self.unet)

    def denoiser_for(self, network) -> "Denoiser":
        """D(x, sigma) -> x0 around `network` (this model's own, or a stand-in for it: a trace)."""
        if self.config.prediction == "flow":
            return flow_denoiser(network)
        return discrete_denoiser(network, self.schedule, self.config.prediction)

    @property
    def latent_channels(self) -> int:
        return self.config.vae.z_channels

    @property
    def latent_factor(self) -> int:
        return self.config.latent_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """What the networks compute in (weights may be stored narrower: marble.models.weight_cast)."""
        return compute_dtype(self.unet)


def tiny_config(name: str = "tiny-random") -> LatentDiffusionConfig:
    """A few-hundred-kilobyte model of the SD shape, for tests and the demo before the built-in model."""
    return LatentDiffusionConfig(
        name=name, unet=UNET_PRESETS["tiny"], vae=VAE_PRESETS["tiny"],
        text={"preset": "clip-tiny"}, default_width=64, default_height=64,
        max_pixels=128 * 128)  # latent factor 2: attention over (side/2)^2 tokens grows fast beyond this
