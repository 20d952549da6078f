"""Samplers: pure functions that walk a denoiser down a descending list of noise levels.

Every sampler has the signature
    sample_x(denoiser, x, sigmas, *, noise, callback=None, **options) -> x
  denoiser(x, sigma) -> x0_hat, sigma of shape (B,), in the VE view x = x0 + σ·eps;
  x        the start, distributed as data + σ_0·noise (pure noise: σ_0·eps);
  sigmas   descending noise levels, normally ending in 0 (the last step then returns x0_hat);
  noise    the injected NoiseSource (the only randomness; deterministic samplers ignore it);
  callback callback(step, total, x0_hat), once per step, step = 0..total-1.
A repeated level (σ_next == σ) is a no-op step. No state survives a call.
Coefficients are computed in float64 from the levels as Python floats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from .denoiser import Denoiser
from .noise import NoiseSource

Callback = Callable[[int, int, torch.Tensor], None]


class Sampler(Protocol):
    def __call__(self, denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                 noise: NoiseSource | None = None, callback: Callback | None = None,
                 **options) -> torch.Tensor: ...


def _levels(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    """The noise levels as Python floats, checked: ≥ 2 entries, finite, ≥ 0, non-increasing."""
    levels = torch.as_tensor(sigmas).detach().cpu().to(torch.float64)
    if levels.ndim != 1 or len(levels) < 2:
        raise ValueError("sigmas must be a 1-D list of at least 2 noise levels")
    if not bool(torch.isfinite(levels).all()) or bool((levels < 0).any()):
        raise ValueError("sigmas must be finite and non-negative")
    if bool((levels[1:] > levels[:-1]).any()):
        raise ValueError("sigmas must be descending")
    return levels.tolist()


def _steps(sigmas) -> list[tuple[int, int, float, float]]:
    """(step, total, σ, σ_next) for each step."""
    levels = _levels(sigmas)
    total = len(levels) - 1
    return [(i, total, levels[i], levels[i + 1]) for i in range(total)]


def _denoise(denoiser: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """D(x, σ) with σ expanded to (B,) in x's dtype. At σ = 0 (a repeated final 0) x is already
    clean, so D(x, 0) = x without a call (a network's c_noise = ln σ would be −inf there)."""
    if sigma == 0:
        return x
    return denoiser(x, x.new_full((x.shape[0],), sigma))


def _need(noise: NoiseSource | None, sampler: str) -> NoiseSource:
    if noise is None:
        raise ValueError(f"the {sampler} sampler is stochastic and needs a NoiseSource")
    return noise


Step = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def _walk(denoiser: Denoiser, x: torch.Tensor, sigmas, callback: Callback | None, step: Step) -> torch.Tensor:
    """The loop every sampler shares: x0 = D(x, σ) and the callback, then `step(x, x0, σ, σ_next)`
    moves x down to σ_next > 0. A repeated level is a no-op, and the step to σ = 0 lands on x0
    (every method here agrees there: no slope is defined at 0)."""
    for i, total, sigma, sigma_next in _steps(sigmas):
        x0 = _denoise(denoiser, x, sigma)
        if callback is not None:
            callback(i, total, x0)
        if sigma_next == sigma:
            continue
        x = x0 if sigma_next == 0 else step(x, x0, sigma, sigma_next)
    return x


# --- deterministic: probability-flow ODE dx/dσ = (x − D(x, σ)) / σ ---------------------------------

def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                 noise: NoiseSource | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn).

    x_next = x + d·(σ_next − σ), d = (x − x0)/σ; written as x0 + (x − x0)·σ_next/σ so that the
    step to σ = 0 lands exactly on x0. First order.
    """
    return _walk(denoiser, x, sigmas, callback,
                 lambda x, x0, sigma, sigma_next: x0 + (x - x0) * (sigma_next / sigma))


def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                noise: NoiseSource | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Alg. 2 without churn): an Euler predictor, then the
    trapezoid of the slopes at both ends. Second order; two denoiser calls per step, one on the
    last step to σ = 0, which is plain Euler (the slope there is undefined)."""
    def step(x, x0, sigma, sigma_next):
        d = (x - x0) / sigma
        x_euler = x + d * (sigma_next - sigma)
        d_next = (x_euler - _denoise(denoiser, x_euler, sigma_next)) / sigma_next
        return x + (d + d_next) * ((sigma_next - sigma) / 2)
    return _walk(denoiser, x, sigmas, callback, step)


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                    noise: NoiseSource | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), k-diffusion's multistep form.

    In time λ = −log σ with step h = λ_next − λ, the exact solution is
    x_next = (σ_next/σ)·x + (1 − σ_next/σ)·x0 for a constant x0 over the step. 2M replaces x0 by
    the linear extrapolation x0 + (x0 − x0_prev)/(2r), r = h_prev/h, from the previous step's
    estimate. Second order. The first step and the step to σ = 0 are first order (k-diffusion).
    A repeated level leaves the history that of the last real step.
    """
    history: list[tuple[torch.Tensor, float]] = []      # (x0, σ) of the last real step

    def step(x, x0, sigma, sigma_next):
        h = math.log(sigma / sigma_next)
        x0_d = x0
        if history:
            x0_prev, sigma_prev = history.pop()
            r = math.log(sigma_prev / sigma) / h
            x0_d = x0 + (x0 - x0_prev) / (2 * r)
        history.append((x0, sigma))
        return x * (sigma_next / sigma) - x0_d * math.expm1(-h)
    return _walk(denoiser, x, sigmas, callback, step)


# --- stochastic ----------------------------------------------------------------------------------

def _abar(sigma: float) -> float:
    """ā = 1/(1 + σ²): the VP signal level of a VE noise level."""
    return 1 / (1 + sigma * sigma)


def _vp(sigma: float, sigma_next: float) -> tuple[float, float, float, float]:
    """ā_t, ā_s, 1 − ā_t, 1 − ā_s for the step t → s; 1 − ā = σ²·ā avoids cancellation."""
    abar_t, abar_s = _abar(sigma), _abar(sigma_next)
    return abar_t, abar_s, sigma ** 2 * abar_t, sigma_next ** 2 * abar_s


def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                noise: NoiseSource | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020): draw z_s from the posterior q(z_s | z_t, x0_hat).

    In the VP view with ā_t, ā_s (s < t) and α = ā_t/ā_s, β = 1 − α (eq. 6–7):
      mean = sqrt(ā_s)·β/(1 − ā_t)·x0 + sqrt(α)·(1 − ā_s)/(1 − ā_t)·z_t,
      var  = β·(1 − ā_s)/(1 − ā_t),
    with z = sqrt(ā)·x and ā = 1/(1 + σ²). Any pair of levels, not only adjacent timesteps.
    """
    noise = _need(noise, "DDPM")

    def step(x, x0, sigma, sigma_next):
        abar_t, abar_s, one_minus_abar_t, one_minus_abar_s = _vp(sigma, sigma_next)
        alpha = abar_t / abar_s
        beta = (sigma ** 2 - sigma_next ** 2) * abar_t      # 1 − ā_t/ā_s
        z = x * math.sqrt(abar_t)
        mean = (x0 * (math.sqrt(abar_s) * beta / one_minus_abar_t)
                + z * (math.sqrt(alpha) * one_minus_abar_s / one_minus_abar_t))
        std = math.sqrt(beta * one_minus_abar_s / one_minus_abar_t)
        return (mean + noise(x) * std) / math.sqrt(abar_s)
    return _walk(denoiser, x, sigmas, callback, step)


def sample_ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                noise: NoiseSource | None = None, callback: Callback | None = None,
                eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12 and 16), in the VP view with z = sqrt(ā)·x:
      z_s = sqrt(ā_s)·x0 + sqrt(1 − ā_s − s_η²)·eps + s_η·noise,  eps = (x − x0)/σ,
      s_η = η·sqrt((1 − ā_s)/(1 − ā_t))·sqrt(1 − ā_t/ā_s).
    η = 0 is deterministic (and equals Euler in σ, Karras et al. 2022 §3); η = 1 has DDPM's
    posterior variance. η in [0, 1]; first order.
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")

    def step(x, x0, sigma, sigma_next):
        abar_t, abar_s, one_minus_abar_t, one_minus_abar_s = _vp(sigma, sigma_next)
        s_eta = eta * math.sqrt(one_minus_abar_s / one_minus_abar_t
                                * (sigma ** 2 - sigma_next ** 2) * abar_t)
        eps = (x - x0) / sigma
        z = x0 * math.sqrt(abar_s) + eps * math.sqrt(max(one_minus_abar_s - s_eta ** 2, 0.0))
        if s_eta > 0:
            z = z + _need(noise, "DDIM with eta > 0")(x) * s_eta
        return z / math.sqrt(abar_s)
    return _walk(denoiser, x, sigmas, callback, step)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion's get_ancestral_step: split σ → σ_next into a deterministic move to σ_down and
    fresh noise σ_up, σ_down² + σ_up² = σ_next². σ_up = η·sqrt(σ_next²(σ² − σ_next²)/σ²)."""
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                           noise: NoiseSource | None = None, callback: Callback | None = None,
                           eta: float = 1.0) -> torch.Tensor:
    """Euler ancestral (k-diffusion): an Euler step down to σ_down, then fresh noise of std σ_up.
    With η = 1 this is the DDPM posterior step written in σ."""
    def step(x, x0, sigma, sigma_next):
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x0 + (x - x0) * (sigma_down / sigma)
        return x + _need(noise, "Euler a")(x) * sigma_up if sigma_up > 0 else x
    return _walk(denoiser, x, sigmas, callback, step)


def sample_lcm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
               noise: NoiseSource | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023 Alg. 1; LCM, Luo et al. 2023):
    x0 = D(x, σ), then x_next = x0 + σ_next·fresh noise. Exact when D is the consistency function
    (the probability-flow ODE's endpoint), which is what an LCM network learns; with a posterior
    mean denoiser it returns posterior means, not samples."""
    noise = _need(noise, "LCM")
    return _walk(denoiser, x, sigmas, callback,
                 lambda x, x0, sigma, sigma_next: x0 + noise(x0) * sigma_next)


# --- registry by user-facing name ----------------------------------------------------------------

@dataclass(frozen=True)
class SamplerSpec:
    name: str                 # user-facing name, as in A1111
    fn: Sampler
    description: str
    spacing: str = "normal"   # default sigma spacing, a key of schedule.SPACINGS
    default_steps: int = 20
    stochastic: bool = False  # draws fresh noise during sampling


# One row a sampler, in the order users see them; a row names only what differs from the defaults.
SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in [
    SamplerSpec("DDPM", sample_ddpm, "DDPM ancestral sampling from the posterior q(x_s | x_t, x0) (Ho et al. 2020)",
                stochastic=True),
    SamplerSpec("DDIM", sample_ddim, "DDIM, eta = 0: deterministic, first order (Song et al. 2021)"),
    SamplerSpec("Euler", sample_euler, "Euler on the probability-flow ODE, first order (Karras et al. 2022)"),
    SamplerSpec("Euler a", sample_euler_ancestral, "Euler ancestral: Euler step plus fresh noise (k-diffusion)",
                stochastic=True),
    SamplerSpec("Heun", sample_heun,
                "Heun on the probability-flow ODE, second order, 2 calls per step (Karras et al. 2022)"),
    SamplerSpec("DPM++ 2M", sample_dpmpp_2m, "DPM-Solver++(2M), second-order multistep (Lu et al. 2022)"),
    SamplerSpec("DPM++ 2M Karras", sample_dpmpp_2m, "DPM-Solver++(2M) on the Karras et al. 2022 noise levels",
                spacing="karras"),
    # trailing: every step at a level the student was trained on, the first at t = T-1 and none
    # wasted at t = 0 ("normal" spends 1 of 2 steps there); diffusers' LCMScheduler is close (999, 759, 499, 259)
    SamplerSpec("LCM", sample_lcm, "multistep consistency sampling for LCM / consistency models (Luo et al. 2023)",
                spacing="trailing", default_steps=4, stochastic=True),
]}

# other spellings in use (k-diffusion / ComfyUI function names), matched after _normalise
_ALIASES = {
    "eulerancestral": "Euler a", "dpmpp2m": "DPM++ 2M", "dpmpp2mkarras": "DPM++ 2M Karras",
}


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in " _-")


class UnknownSampler(KeyError):
    """A KeyError whose str() is the plain message (KeyError's own quotes it)."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_sampler(name: str) -> SamplerSpec:
    """The sampler by name; case, spaces, '_' and '-' are ignored ("euler_a" is "Euler a")."""
    key = _normalise(name)
    for spec in SAMPLERS.values():
        if _normalise(spec.name) == key:
            return spec
    if key in _ALIASES:
        return SAMPLERS[_ALIASES[key]]
    raise UnknownSampler(f"unknown sampler {name!r}; choose from: {', '.join(SAMPLERS)}")

