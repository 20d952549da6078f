"""Diffusion pieces that only the tests use, moved out of marble/diffusion/ (issue 13): the EDM
continuous-σ network wrapper and schedule (Karras et al. 2022), eps from x0, running a registered
sampler by name, and a batch of seeded noise generators. They are built on marble's own contract
(`wrap_network`, `x0_conversion`, `NoiseSource`), so the tests that use them still test marble.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from marble.diffusion.denoiser import (
    Denoiser, Network, Sigma, broadcast_sigma, c_in, wrap_network, x0_conversion,
)
from marble.diffusion.noise import NoiseSource
from marble.diffusion.samplers import Callback, SamplerSpec, get_sampler


def eps_from_x0(x: torch.Tensor, sigma: Sigma, x0: torch.Tensor) -> torch.Tensor:
    """eps = (x − x0) / σ."""
    return (x - x0) / broadcast_sigma(sigma, x)


def noise_from_seed(seed: int, batch_size: int) -> NoiseSource:
    """Item i draws from generator seed + i."""
    return NoiseSource([seed + i for i in range(batch_size)])


def sample(sampler: SamplerSpec | str, denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
           noise: NoiseSource | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Run a registered sampler with its default options."""
    spec = get_sampler(sampler) if isinstance(sampler, str) else sampler
    return spec.fn(denoiser, x, sigmas, noise=noise, callback=callback)


@dataclass(frozen=True)
class ContinuousSchedule:
    """A model trained on a continuous range of noise levels (EDM: σ in [0.002, 80])."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")


# --- EDM preconditioning (Karras et al. 2022, Table 1) ---------------------------------------------

def edm_c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """EDM's network time input c_noise = ln(σ)/4."""
    return sigma.log() / 4


def edm_scalings(sigma: Sigma, sigma_data: float) -> tuple[Sigma, Sigma, Sigma]:
    """(c_skip, c_out, c_in) of D = c_skip·x + c_out·F(c_in·x, c_noise):
    c_skip = σd²/(σ² + σd²), c_out = σ·σd/sqrt(σ² + σd²), c_in = 1/sqrt(σ² + σd²)."""
    norm = (sigma ** 2 + sigma_data ** 2) ** 0.5
    return sigma_data ** 2 / norm ** 2, sigma * sigma_data / norm, 1 / norm


def _edm_x0(sigma_data: float):
    def to_x0(x: torch.Tensor, sigma: Sigma, out: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, _ = edm_scalings(broadcast_sigma(sigma, x), sigma_data)
        return c_skip * x + c_out * out
    return to_x0


def _edm_c_in(sigma_data: float):
    def scale(sigma: Sigma) -> Sigma:
        return 1 / (sigma ** 2 + sigma_data ** 2) ** 0.5
    return scale


def continuous_denoiser(network: Network, prediction: str = "edm", sigma_data: float = 0.5,
                        c_noise: Callable[[torch.Tensor], torch.Tensor] = edm_c_noise) -> Denoiser:
    """A network trained on continuous σ; it sees c_noise(σ) (default EDM's ln(σ)/4).

    prediction "edm": EDM preconditioning with `sigma_data` (Karras et al. 2022 Table 1).
    prediction "eps" | "v" | "x0": the plain VP-scaled variant, input c_in(σ)·x as for
    discrete networks (sigma_data is unused).
    """
    if prediction == "edm":
        return wrap_network(network, _edm_c_in(sigma_data), c_noise, _edm_x0(sigma_data))
    return wrap_network(network, c_in, c_noise, x0_conversion(prediction))
