"""Hand-off between two denoisers along one sampling run: SDXL's base → refiner (Podell et al. 2023,
§2.5, an ensemble of expert denoisers; diffusers' `denoising_end` / `denoising_start`, A1111's
refiner switch). A closure around the two denoisers: the sampler's loop is unchanged.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .denoiser import Denoiser


def handoff_denoiser(first: Denoiser, second: Denoiser, sigma_switch: float) -> Denoiser:
    """`first` at noise levels above `sigma_switch`, `second` at and below it."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        level = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        return first(x, sigma) if level > sigma_switch else second(x, sigma)

    return denoise


def switch_sigma(sigmas: torch.Tensor, sigma_to_t: Callable[[torch.Tensor], torch.Tensor], fraction: float,
                 n_train: int = 1000) -> float:
    """The σ that splits `sigmas` (ending in 0) as diffusers does: the steps whose timestep is at
    least round(n_train · (1 − fraction)) belong to the first denoiser, the rest to the second.
    Returned between the last step of one and the first of the other (geometric mean), so each
    step's evaluation at its own σ falls on its side; +inf / −1 when one side has no step."""
    cutoff = round(n_train - fraction * n_train)
    steps = sigmas[:-1].double()
    t = sigma_to_t(steps.to(sigmas.dtype)).double()
    first = int((t >= cutoff - 1e-3).sum())   # timesteps come back from σ with float error; cutoff is an integer
    if first == 0:
        return math.inf
    if first == len(steps):
        return -1.0
    return math.sqrt(float(steps[first - 1]) * float(steps[first]))
