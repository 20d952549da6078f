"""The denoiser contract D(x, sigma, **cond) -> x0_hat, and wrappers that bring networks to it.

`Denoiser` and `broadcast_sigma` are the one type and the one σ reshape of diffusion/: samplers call
D(x, sigma) with no cond (guidance closes over it), wrappers and guidance take it with cond.

The samplers see only the VE view of the forward process (k-diffusion, Karras et al. 2022):
    x = x0 + σ·eps,    eps ~ N(0, I)
A network trained in the VP view (DDPM, Stable Diffusion) sees z = sqrt(ā)·x0 + sqrt(1 − ā)·eps
with ā = 1 / (1 + σ²), i.e. z = c_in(σ)·x, and predicts eps, v or x0 from z.
A rectified-flow network (Liu et al. 2022; Esser et al. 2024) sees x_t = (1 − t)·x0 + t·eps,
t ∈ [0, 1], and predicts the velocity u = eps − x0. Dividing by 1 − t gives the VE view:
x_t/(1 − t) = x0 + t/(1 − t)·eps, so σ = t/(1 − t), t = σ/(1 + σ), x_t = x/(1 + σ).
`sigma` is a tensor of shape (B,) (one level per batch item); a 0-d tensor or a float is broadcast.
"""
from __future__ import annotations

from typing import Callable

import torch

from .schedule import DiscreteSchedule

Denoiser = Callable[..., torch.Tensor]          # D(x, sigma, **cond) -> x0_hat; sigma (B,)
Network = Callable[..., torch.Tensor]           # network(x_in, t, **cond) -> eps | v | x0 | F
Sigma = torch.Tensor | float


def broadcast_sigma(sigma: Sigma, x: torch.Tensor) -> Sigma:
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
    return x0 + broadcast_sigma(sigma, x0) * eps


def add_noise_vp(x0: torch.Tensor, sigma: Sigma, eps: torch.Tensor) -> torch.Tensor:
    """VP forward process (Ho et al. 2020 eq. 4) q(z | x0) = N(sqrt(ā)·x0, (1 − ā)I),
    with ā = 1/(1 + σ²): z = c_in(σ)·(x0 + σ·eps), the VE sample scaled by c_in."""
    return c_in(broadcast_sigma(sigma, x0)) * add_noise(x0, sigma, eps)


# --- conversions between what a network predicts and x0 ----------------------------------------

def c_in(sigma: Sigma) -> Sigma:
    """VP input scaling 1/sqrt(σ² + 1) = sqrt(ā): z = c_in·x."""
    return 1 / (sigma ** 2 + 1) ** 0.5


def x0_from_eps(x: torch.Tensor, sigma: Sigma, eps: torch.Tensor) -> torch.Tensor:
    """x = x0 + σ·eps  ⇒  x0 = x − σ·eps."""
    return x - broadcast_sigma(sigma, x) * eps


def x0_from_v(x: torch.Tensor, sigma: Sigma, v: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho 2022: with α = sqrt(ā) = c_in, s = sqrt(1 − ā) = σ·c_in, z = α·x0 + s·eps and
    v = α·eps − s·x0, we get x0 = α·z − s·v = x/(σ² + 1) − σ/sqrt(σ² + 1)·v (k-diffusion's
    CompVisVDenoiser with sigma_data = 1)."""
    s = broadcast_sigma(sigma, x)
    return x / (s ** 2 + 1) - s * c_in(s) * v


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, sigma: Sigma) -> torch.Tensor:
    """The v-prediction target: v = α·eps − s·x0 = (eps − σ·x0) / sqrt(σ² + 1)."""
    s = broadcast_sigma(sigma, x0)
    return (eps - s * x0) * c_in(s)


def x0_from_x0(x: torch.Tensor, sigma: Sigma, x0: torch.Tensor) -> torch.Tensor:
    """An x0-predicting network needs no conversion."""
    return x0


X0_FROM: dict[str, Callable[[torch.Tensor, Sigma, torch.Tensor], torch.Tensor]] = {
    "eps": x0_from_eps,
    "v": x0_from_v,
    "x0": x0_from_x0,
}


def x0_conversion(prediction: str) -> Callable[[torch.Tensor, Sigma, torch.Tensor], torch.Tensor]:
    """The map (x, σ, network output) -> x0 for a prediction type; ValueError names the choices."""
    if prediction not in X0_FROM:
        raise ValueError(f"unknown prediction type {prediction!r}; choose from {', '.join(X0_FROM)}")
    return X0_FROM[prediction]


# --- rectified flow: its time t <-> σ ----------------------------------------------------------------

FLOW_TIME_SCALE = 1000.0    # the network sees 1000·t, as SD3 embeds it: the sinusoids' range of timesteps


def flow_t(sigma: Sigma) -> Sigma:
    """t = σ/(1 + σ): x_t = (1 − t)·x0 + t·eps is the VE sample x = x0 + σ·eps times 1 − t."""
    return sigma / (1 + sigma)


def flow_sigma(t: Sigma) -> Sigma:
    """σ = t/(1 − t), the inverse of flow_t."""
    return t / (1 - t)


def add_noise_flow(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The rectified-flow forward process: x_t = (1 − t)·x0 + t·eps, t (B,) in [0, 1]."""
    t = broadcast_sigma(t, x0)
    return (1 - t) * x0 + t * eps


def x0_from_flow(x: torch.Tensor, sigma: Sigma, u: torch.Tensor) -> torch.Tensor:
    """x0 = x_t − t·u with x_t = x/(1 + σ), t = σ/(1 + σ): x0 = (x − σ·u)/(1 + σ)."""
    s = broadcast_sigma(sigma, x)
    return (x - s * u) / (1 + s)


# --- wrappers: network -> denoiser -----------------------------------------------------------------

def wrap_network(network: Network, scale_in, network_time, to_x0) -> Denoiser:
    """D(x, σ) = to_x0(x, σ, network(scale_in(σ)·x, network_time(σ), **cond))."""

    def denoise(x: torch.Tensor, sigma: Sigma, **cond) -> torch.Tensor:
        sigma = sigma_batch(sigma, x)
        out = network(x * scale_in(broadcast_sigma(sigma, x)), network_time(sigma), **cond)
        return to_x0(x, sigma, out)

    return denoise


def discrete_denoiser(network: Network, schedule: DiscreteSchedule, prediction: str = "eps") -> Denoiser:
    """A network trained on a DiscreteSchedule's timesteps (Stable Diffusion, DDPM): it sees
    z = c_in(σ)·x and the fractional timestep t = schedule.sigma_to_t(σ), shape (B,), float32 or
    wider, and predicts `prediction` ("eps", "v" or "x0")."""
    return wrap_network(network, c_in, schedule.sigma_to_t, x0_conversion(prediction))


def flow_denoiser(network: Network) -> Denoiser:
    """A rectified-flow network: it sees x_t = x/(1 + σ) and FLOW_TIME_SCALE·t with t = σ/(1 + σ),
    and predicts the velocity eps − x0. No discrete timesteps: any σ > 0 is a valid time."""
    return wrap_network(network, lambda s: 1 / (1 + s), lambda s: FLOW_TIME_SCALE * flow_t(s),
                        x0_from_flow)
