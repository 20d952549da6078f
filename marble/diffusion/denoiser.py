"""The denoiser contract D(x, sigma, **cond) -> x0_hat, and wrappers that bring networks to it.

The samplers see only the VE view of the forward process (k-diffusion, Karras et al. 2022):
    x = x0 + σ·eps,    eps ~ N(0, I)
A network trained in the VP view (DDPM, Stable Diffusion) sees z = sqrt(ā)·x0 + sqrt(1 − ā)·eps
with ā = 1 / (1 + σ²), i.e. z = c_in(σ)·x, and predicts eps, v or x0 from z.
`sigma` is a tensor of shape (B,) (one level per batch item); a 0-d tensor or a float is broadcast.
"""
from __future__ import annotations

from typing import Callable

import torch

from .schedule import DiscreteSchedule

Denoiser = Callable[..., torch.Tensor]          # D(x, sigma, **cond) -> x0_hat
Network = Callable[..., torch.Tensor]           # network(x_in, t, **cond) -> eps | v | x0 | F
Sigma = torch.Tensor | float


def _expand(sigma: Sigma, x: torch.Tensor) -> Sigma:
    """σ shaped to broadcast against x: (B,) becomes (B, 1, ..., 1); scalars stay as they are."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1 and x.ndim > 1:
        return sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return sigma


def sigma_batch(sigma: Sigma, x: torch.Tensor) -> torch.Tensor:
    """σ as a (B,) tensor on x's device; a float takes x's dtype."""
    if not isinstance(sigma, torch.Tensor):
        return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
    return sigma.to(x.device).reshape(-1).expand(x.shape[0])  # one level, or one per item


# --- forward process -----------------------------------------------------------------------------

def add_noise(x0: torch.Tensor, sigma: Sigma, eps: torch.Tensor) -> torch.Tensor:
    """VE forward process q(x_σ | x0) = N(x0, σ²I): x = x0 + σ·eps."""
    return x0 + _expand(sigma, x0) * eps


def add_noise_vp(x0: torch.Tensor, sigma: Sigma, eps: torch.Tensor) -> torch.Tensor:
    """VP forward process (Ho et al. 2020 eq. 4) q(z | x0) = N(sqrt(ā)·x0, (1 − ā)I),
    with ā = 1/(1 + σ²): z = c_in(σ)·(x0 + σ·eps)."""
    s = _expand(sigma, x0)
    return c_in(s) * (x0 + s * eps)


# --- conversions between what a network predicts and x0 ----------------------------------------

def c_in(sigma: Sigma) -> Sigma:
    """VP input scaling 1/sqrt(σ² + 1) = sqrt(ā): z = c_in·x."""
    return 1 / (sigma ** 2 + 1) ** 0.5


def x0_from_eps(x: torch.Tensor, sigma: Sigma, eps: torch.Tensor) -> torch.Tensor:
    """x = x0 + σ·eps  ⇒  x0 = x − σ·eps."""
    return x - _expand(sigma, x) * eps


def eps_from_x0(x: torch.Tensor, sigma: Sigma, x0: torch.Tensor) -> torch.Tensor:
    """eps = (x − x0) / σ."""
    return (x - x0) / _expand(sigma, x)


def x0_from_v(x: torch.Tensor, sigma: Sigma, v: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho 2022: with α = sqrt(ā) = c_in, s = sqrt(1 − ā) = σ·c_in, z = α·x0 + s·eps and
    v = α·eps − s·x0, we get x0 = α·z − s·v = x/(σ² + 1) − σ/sqrt(σ² + 1)·v (k-diffusion's
    CompVisVDenoiser with sigma_data = 1)."""
    s = _expand(sigma, x)
    return x / (s ** 2 + 1) - s * c_in(s) * v


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, sigma: Sigma) -> torch.Tensor:
    """The v-prediction target: v = α·eps − s·x0 = (eps − σ·x0) / sqrt(σ² + 1)."""
    s = _expand(sigma, x0)
    return (eps - s * x0) * c_in(s)


def x0_from_x0(x: torch.Tensor, sigma: Sigma, x0: torch.Tensor) -> torch.Tensor:
    """An x0-predicting network needs no conversion."""
    return x0


X0_FROM: dict[str, Callable[[torch.Tensor, Sigma, torch.Tensor], torch.Tensor]] = {
    "eps": x0_from_eps,
    "v": x0_from_v,
    "x0": x0_from_x0,
}


def _x0_conversion(prediction: str):
    if prediction not in X0_FROM:
        raise ValueError(f"unknown prediction type {prediction!r}; choose from {', '.join(X0_FROM)}")
    return X0_FROM[prediction]


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
        c_skip, c_out, _ = edm_scalings(_expand(sigma, x), sigma_data)
        return c_skip * x + c_out * out
    return to_x0


def _edm_c_in(sigma_data: float):
    def scale(sigma: Sigma) -> Sigma:
        return 1 / (sigma ** 2 + sigma_data ** 2) ** 0.5
    return scale


# --- wrappers: network -> denoiser -----------------------------------------------------------------

def _wrap(network: Network, scale_in, network_time, to_x0) -> Denoiser:
    """D(x, σ) = to_x0(x, σ, network(scale_in(σ)·x, network_time(σ), **cond))."""

    def denoise(x: torch.Tensor, sigma: Sigma, **cond) -> torch.Tensor:
        sigma = sigma_batch(sigma, x)
        out = network(x * scale_in(_expand(sigma, x)), network_time(sigma), **cond)
        return to_x0(x, sigma, out)

    return denoise


def discrete_denoiser(network: Network, schedule: DiscreteSchedule, prediction: str = "eps") -> Denoiser:
    """A network trained on a DiscreteSchedule's timesteps (Stable Diffusion, DDPM): it sees
    z = c_in(σ)·x and the fractional timestep t = schedule.sigma_to_t(σ), shape (B,), float32 or
    wider, and predicts `prediction` ("eps", "v" or "x0")."""
    return _wrap(network, c_in, schedule.sigma_to_t, _x0_conversion(prediction))


def continuous_denoiser(network: Network, prediction: str = "edm", sigma_data: float = 0.5,
                        c_noise: Callable[[torch.Tensor], torch.Tensor] = edm_c_noise) -> Denoiser:
    """A network trained on continuous σ; it sees c_noise(σ) (default EDM's ln(σ)/4).

    prediction "edm": EDM preconditioning with `sigma_data` (Karras et al. 2022 Table 1).
    prediction "eps" | "v" | "x0": the plain VP-scaled variant, input c_in(σ)·x as for
    discrete networks (sigma_data is unused).
    """
    if prediction == "edm":
        return _wrap(network, _edm_c_in(sigma_data), c_noise, _edm_x0(sigma_data))
    return _wrap(network, c_in, c_noise, _x0_conversion(prediction))

