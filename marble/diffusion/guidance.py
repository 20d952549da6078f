"""Closures around a denoiser: classifier-free guidance and inpainting masks.

A mode never gets its own sampling loop; it wraps `denoiser(x, sigma, **cond) -> x0`.
"""
from __future__ import annotations

import torch

from .denoiser import Denoiser, broadcast_sigma


def _cat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def cfg_denoiser(denoiser: Denoiser, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor],
                 scale: float) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): D = D_u + scale · (D_c − D_u).

    Unconditional and conditional predictions come from one batched call [uncond; cond]. Guidance
    on x0 equals guidance on eps for the wrappers in denoiser.py, as both are affine in the network
    output with the same coefficients. `scale` is the CFG scale, ≥ 0; 1 is the plain conditional.
    """
    both = _cat(uncond, cond)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0_uncond, x0_cond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return torch.lerp(x0_uncond, x0_cond, scale) if scale != 1.0 else x0_cond

    return denoise


def conditional_denoiser(denoiser: Denoiser, cond: dict[str, torch.Tensor]) -> Denoiser:
    """The conditional prediction alone: what guidance at scale 1 reduces to, at half the cost."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return denoiser(x, sigma, **cond)

    return denoise


def guided_denoiser(denoiser: Denoiser, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor],
                    scale: float) -> Denoiser:
    """CFG, skipping the unconditional half when it cannot change the result (scale == 1)."""
    if scale == 1.0:
        return conditional_denoiser(denoiser, cond)
    return cfg_denoiser(denoiser, cond, uncond, scale)


def inpaint_denoiser(denoiser: Denoiser, known: torch.Tensor,
                     mask: torch.Tensor, noise: torch.Tensor) -> Denoiser:
    """Re-impose the known latent outside the mask at the current noise level.

    `mask` is 1 where the image is repainted and 0 where it is kept (broadcast over channels).
    The kept region is replaced by `known + sigma · noise` before each call, with one fixed noise
    draw, and its x0 estimate by `known`. For the deterministic samplers the kept region then
    follows exactly `known + sigma_i · noise` along the schedule and ends at `known`.
    """
    keep = 1.0 - mask

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x = mask * x + keep * (known + broadcast_sigma(sigma, x) * noise)
        return mask * denoiser(x, sigma) + keep * known

    return denoise
