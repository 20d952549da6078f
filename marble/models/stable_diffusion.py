"""Stable Diffusion 1.x / 2.x as marble model configs: the released architectures by name.

SD1.x: CLIP ViT-L/14 text (last layer), 8-head U-Net, eps prediction, 512².
SD2.x: OpenCLIP ViT-H/14 text (penultimate layer), 64-channel heads and linear transformer
projections; "sd21-v" (768-v) predicts v at 768², "sd21-base" predicts eps at 512².
The inpainting variants take 9 input channels: latent + mask + masked-image latent (ldm's c_concat).
SDXL (Podell et al. 2023): CLIP ViT-L + OpenCLIP ViT-bigG text, a 2.6B U-Net with vector conditioning
(pooled text + size micro-conditioning; marble.models.conditioning), eps at 1024², its own VAE
weights (latent scale 0.13025). The refiner: bigG alone, conditioned on an aesthetic score.
All share the KL-f8 VAE architecture and ldm's schedule (scaled linear betas 0.00085 → 0.012, 1000 steps).
"""
from __future__ import annotations

from marble.models.conditioning import VectorConditioning
from marble.models.latent_diffusion import LatentDiffusionConfig
from marble.models.unet import UNET_PRESETS
from marble.models.vae import VAE_PRESETS

SD_SCHEDULE = {"name": "scaled_linear", "n": 1000, "beta_start": 0.00085, "beta_end": 0.012}

# preset -> (U-Net preset, text encoder preset, prediction, default side in pixels)
_SD_SHAPES = {
    "sd15": ("sd15", "clip-vit-l-14", "eps", 512),
    "sd15-inpaint": ("sd15-inpaint", "clip-vit-l-14", "eps", 512),
    "sd21-v": ("sd21", "openclip-vit-h-14", "v", 768),
    "sd21-base": ("sd21", "openclip-vit-h-14", "eps", 512),
    "sd2-inpaint": ("sd2-inpaint", "openclip-vit-h-14", "eps", 512),
}
# SDXL preset -> (U-Net preset, text encoder preset, vector conditioning); eps at 1024²
_SDXL_SHAPES = {
    "sdxl-base": ("sdxl-base", "sdxl-base-text", VectorConditioning()),
    # the refiner's diffusers pipeline has force_zeros_for_empty_prompt off
    "sdxl-refiner": ("sdxl-refiner", "sdxl-refiner-text", VectorConditioning(micro="aesthetic",
                                                                             zero_empty_negative=False)),
}
SD_PRESETS = (*_SD_SHAPES, *_SDXL_SHAPES)


def sd_config(preset: str = "sd15", name: str | None = None, prediction: str | None = None,
              clip_skip: int = 1) -> LatentDiffusionConfig:
    """The config of a released SD architecture. `prediction` overrides the preset's; `clip_skip`
    is A1111's (1 = the text encoder's last layer)."""
    if preset in _SDXL_SHAPES:
        return sdxl_config(preset, name, prediction)
    if preset not in _SD_SHAPES:
        raise ValueError(f"unknown Stable Diffusion preset {preset!r}; choose from {', '.join(SD_PRESETS)}")
    unet, text, default_prediction, side = _SD_SHAPES[preset]
    text_config = {"preset": text} if clip_skip == 1 else {"preset": text, "clip_skip": clip_skip}
    return LatentDiffusionConfig(
        name=name or preset, unet=UNET_PRESETS[unet], vae=VAE_PRESETS["sd"], text=text_config,
        schedule=dict(SD_SCHEDULE), prediction=prediction or default_prediction,
        default_width=side, default_height=side, default_steps=20, default_cfg=7.0, default_sampler="Euler a")


def sdxl_config(preset: str = "sdxl-base", name: str | None = None, prediction: str | None = None) -> LatentDiffusionConfig:
    """The config of SDXL base or refiner (sgm's sd_xl_base.yaml / sd_xl_refiner.yaml)."""
    unet, text, vector = _SDXL_SHAPES[preset]
    return LatentDiffusionConfig(
        name=name or preset, unet=UNET_PRESETS[unet], vae=VAE_PRESETS["sdxl"], text={"preset": text},
        schedule=dict(SD_SCHEDULE), prediction=prediction or "eps", default_width=1024, default_height=1024,
        default_steps=20, default_cfg=7.0, default_sampler="Euler a", vector=vector)
