"""Noise schedules: betas → alphas_cumprod ↔ sigmas, and the sigma spacings a sampler walks.

Two views of the same forward process, related by ā = 1 / (1 + σ²):
  VP (DDPM):  z = sqrt(ā)·x0 + sqrt(1 − ā)·eps
  VE (k-diffusion, what samplers see):  x = z / sqrt(ā) = x0 + σ·eps,  σ = sqrt((1 − ā) / ā)
A model trained on T discrete timesteps knows only the noise levels `sigmas[t]`, t = 0..T-1.
Everything is computed in float64; spacings are handed out as float32, ending in exactly 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

F64 = torch.float64


# --- beta schedules (VP, per training timestep) --------------------------------------------------

def betas_linear(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020: betas linear in t."""
    return torch.linspace(beta_start, beta_end, n, dtype=F64)


def betas_scaled_linear(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule: sqrt(beta) linear in t, then squared."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=F64) ** 2


def betas_cosine(n: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17: ā(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2);
    beta_t = 1 − ā(t)/ā(t−1), clipped to max_beta so the last step stays finite."""
    f = torch.cos((torch.arange(n + 1, dtype=F64) / n + s) / (1 + s) * (math.pi / 2)) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


BETA_SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": betas_linear,
    "scaled_linear": betas_scaled_linear,
    "cosine": betas_cosine,
}


# --- conversions ---------------------------------------------------------------------------------

def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """ā_t = Π_{i≤t} (1 − beta_i)."""
    return torch.cumprod(1 - betas.to(F64), dim=0)


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """beta_t = 1 − ā_t / ā_{t−1}, with ā_{−1} = 1."""
    ac = alphas_cumprod.to(F64)
    return 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ = sqrt((1 − ā) / ā)."""
    ac = alphas_cumprod.to(F64)
    return ((1 - ac) / ac).sqrt()


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """ā = 1 / (1 + σ²)."""
    return 1 / (1 + sigmas.to(F64) ** 2)


# --- schedules -----------------------------------------------------------------------------------

def _float_out(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Back on the input's device, in its float dtype (at least float32)."""
    dtype = torch.promote_types(like.dtype, torch.float32) if like.is_floating_point() else F64
    return result.to(device=like.device, dtype=dtype)


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """The noise levels a model was trained on: `sigmas[t]`, t = 0..T-1, strictly ascending."""

    sigmas: torch.Tensor  # (T,) float64 on the CPU

    def __post_init__(self):
        sigmas = torch.as_tensor(self.sigmas).detach().cpu().to(F64)
        if sigmas.ndim != 1 or len(sigmas) < 2:
            raise ValueError("a DiscreteSchedule needs a 1-D tensor of at least 2 sigmas")
        if not bool((sigmas > 0).all()) or not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("schedule sigmas must be positive and strictly ascending")
        object.__setattr__(self, "sigmas", sigmas)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "DiscreteSchedule":
        return cls.from_alphas_cumprod(alphas_cumprod_from_betas(betas))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> "DiscreteSchedule":
        return cls(sigmas_from_alphas_cumprod(alphas_cumprod))

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return alphas_cumprod_from_sigmas(self.sigmas)

    @property
    def log_sigmas(self) -> torch.Tensor:
        return self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Fractional timestep of a noise level: linear in log σ between the neighbouring
        discrete timesteps (k-diffusion's DiscreteSchedule), clamped to [0, T-1]."""
        sigma = torch.as_tensor(sigma)
        log_sigma = sigma.detach().cpu().to(F64).reshape(-1).log()  # MPS has no float64: CPU first
        log_sigmas = self.log_sigmas
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return _float_out((low + w).reshape(sigma.shape), sigma)

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Noise level of a fractional timestep: log σ linear between neighbouring timesteps."""
        t = torch.as_tensor(t)
        tc = t.detach().cpu().to(F64).clamp(0, self.num_timesteps - 1)
        low = tc.floor().long().clamp(max=self.num_timesteps - 2)
        w = tc - low
        log_sigmas = self.log_sigmas
        return _float_out(torch.lerp(log_sigmas[low], log_sigmas[low + 1], w).exp(), t)


# ā_T of a zero-terminal-SNR schedule as the sampler sees it: σ must stay finite, so the last level
# is clamped to ā = 2^-24 (σ ≈ 4096), diffusers' choice for its Euler-type schedulers.
ZERO_SNR_FLOOR = 2.0 ** -24


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1:
    shift and scale sqrt(ā) so that it keeps its first value and ends at exactly 0. Otherwise the
    last training step still holds sqrt(ā_T) of the image (0.068 for SD's schedule), which a model
    learns to read while sampling starts from pure noise."""
    root = alphas_cumprod_from_betas(betas).sqrt()
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    return betas_from_alphas_cumprod(root ** 2)


def flow_schedule(n: int = 1000, shift: float = 1.0) -> DiscreteSchedule:
    """The noise levels of a rectified-flow model (marble.diffusion.denoiser: σ = t/(1 − t)) at
    t_i = (i + 1)/n, shifted toward noise by `shift` as SD3 does (Esser et al. 2024 eq. 23:
    t' = shift·t/(1 + (shift − 1)·t)). t = 1 is pure noise and σ = ∞: the last level is clamped to
    σ = 4096, the zero-terminal-SNR floor (ā = 2^-24). The spacings ("normal" is uniform in t) and
    the σ range for Karras read it as they read any schedule."""
    t = torch.arange(1, n + 1, dtype=F64) / n
    t = shift * t / (1 + (shift - 1) * t)
    cap = 1 / ZERO_SNR_FLOOR ** 0.5                     # σ at ā = 2^-24
    return DiscreteSchedule((t / (1 - t).clamp(min=1e-12)).clamp(max=cap))


def make_schedule(name: str, n: int = 1000, zero_terminal_snr: bool = False, **kw) -> DiscreteSchedule:
    """A DiscreteSchedule from a beta schedule by name: "linear", "scaled_linear", "cosine";
    `zero_terminal_snr` rescales it so the last timestep is pure noise (clamped, see ZERO_SNR_FLOOR).
    "flow" (with `shift`) is a rectified-flow model's (flow_schedule)."""
    if name == "flow":
        if zero_terminal_snr:
            raise ValueError("a flow schedule ends in pure noise already; zero_terminal_snr does not apply")
        return flow_schedule(n, **kw)
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; choose from {', '.join(BETA_SCHEDULES)}")
    betas = BETA_SCHEDULES[name](n, **kw)
    if not zero_terminal_snr:
        return DiscreteSchedule.from_betas(betas)
    alphas_cumprod = alphas_cumprod_from_betas(rescale_zero_terminal_snr(betas))
    alphas_cumprod[-1] = ZERO_SNR_FLOOR
    return DiscreteSchedule.from_alphas_cumprod(alphas_cumprod)


# --- sigma spacings: what a sampler walks, descending, steps + 1 entries ending in 0 ----------------

def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(F64), sigmas.new_zeros(1, dtype=F64)]).to(torch.float32)


def _need_discrete(schedule, spacing: str) -> DiscreteSchedule:
    if not isinstance(schedule, DiscreteSchedule):
        raise ValueError(f"the {spacing!r} spacing needs a model with discrete timesteps")
    return schedule


def spacing_normal(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """The model's own timesteps, t = linspace(T-1, 0, steps) (A1111/k-diffusion "normal";
    the same t as diffusers' "linspace"; σ between timesteps is log-linear as in k-diffusion)."""
    _check_steps(steps)
    t = torch.linspace(schedule.num_timesteps - 1, 0, steps, dtype=F64)
    return _append_zero(schedule.t_to_sigma(t))


def timesteps_leading(num_timesteps: int, steps: int, offset: int = 1) -> np.ndarray:
    """diffusers' "leading" timesteps: k · (T // steps) + offset, k = steps-1..0."""
    _check_steps(steps)
    ratio = num_timesteps // steps
    t = np.arange(steps)[::-1] * ratio + offset
    if ratio == 0 or t[0] > num_timesteps - 1 or t[-1] < 0:
        raise ValueError(f"{steps} leading steps with offset {offset} do not fit in {num_timesteps} timesteps")
    return t.astype(np.int64)


def timesteps_trailing(num_timesteps: int, steps: int) -> np.ndarray:
    """diffusers' "trailing" timesteps: round(T − k · T/steps) − 1, k = 0..steps-1."""
    _check_steps(steps)
    if steps > num_timesteps:
        raise ValueError(f"{steps} trailing steps do not fit in {num_timesteps} timesteps")
    # np.arange with a float step, as diffusers writes it: its accumulated rounding decides the
    # half-way cases (e.g. 937.5 for 48 steps). For some step counts (61, 103, ...) arange yields
    # one extra entry that would become t = −1; we keep exactly `steps`.
    t = np.arange(num_timesteps, 0, -num_timesteps / steps)[:steps]
    return t.round().astype(np.int64) - 1


LCM_ORIGINAL_STEPS = 50   # diffusers' LCMScheduler default: the distillation's skipping-step schedule


def timesteps_lcm(num_timesteps: int, steps: int, original_steps: int = LCM_ORIGINAL_STEPS) -> np.ndarray:
    """diffusers' LCMScheduler timesteps: of the distillation's `original_steps` timesteps
    (k · T/original − 1, k = 1..original, so t = 999 is one), `steps` evenly spaced by index from
    the top: floor(linspace(0, original, steps, endpoint=False)). 4 steps: 999, 759, 499, 259."""
    _check_steps(steps)
    if steps > original_steps or num_timesteps // original_steps < 1:
        raise ValueError(f"the LCM spacing takes at most {original_steps} steps, not {steps}")
    origin = (np.arange(1, original_steps + 1) * (num_timesteps // original_steps) - 1)[::-1]
    return origin[np.floor(np.linspace(0, original_steps, steps, endpoint=False)).astype(np.int64)].astype(np.int64)


def spacing_linspace(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """diffusers' "linspace": t = linspace(0, T-1, steps) reversed, σ interpolated linearly in t
    (np.interp), where "normal" interpolates log σ. For 1 step diffusers takes t = 0 (σ_min), and so
    does this: it is kept for exact parity, not for use."""
    _check_steps(steps)
    t = np.linspace(0, schedule.num_timesteps - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
    sigmas = np.interp(t, np.arange(schedule.num_timesteps), schedule.sigmas.numpy())
    return _append_zero(torch.from_numpy(sigmas))


def spacing_lcm(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """σ at diffusers' LCMScheduler timesteps (the LCM-LoRA cards' scheduler)."""
    t = timesteps_lcm(schedule.num_timesteps, steps)
    return _append_zero(schedule.sigmas[torch.from_numpy(t)])


def spacing_leading(schedule: DiscreteSchedule, steps: int, offset: int = 1) -> torch.Tensor:
    """σ at diffusers' "leading" timesteps (SD1.5's scheduler config: steps_offset = 1)."""
    t = timesteps_leading(schedule.num_timesteps, steps, offset)
    return _append_zero(schedule.sigmas[torch.from_numpy(t)])


def spacing_trailing(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """σ at diffusers' "trailing" timesteps (starts at t = T-1 for any step count)."""
    t = timesteps_trailing(schedule.num_timesteps, steps)
    return _append_zero(schedule.sigmas[torch.from_numpy(t)])


def spacing_karras(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5: σ_i = (σmax^(1/ρ) + i/(N−1) · (σmin^(1/ρ) − σmax^(1/ρ)))^ρ."""
    _check_steps(steps)
    ramp = torch.linspace(0, 1, steps, dtype=F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def spacing_exponential(sigma_min: float, sigma_max: float, steps: int) -> torch.Tensor:
    """Uniform in log σ from σmax down to σmin."""
    _check_steps(steps)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=F64).exp())


class Schedule(Protocol):
    """What the karras and exponential spacings need of a model: its range of noise levels. A
    DiscreteSchedule has it; so would a model trained on continuous σ (EDM: [0.002, 80])."""

    @property
    def sigma_min(self) -> float: ...

    @property
    def sigma_max(self) -> float: ...


def _normal(schedule: Schedule, steps: int) -> torch.Tensor:
    return spacing_normal(_need_discrete(schedule, "normal"), steps)


def _leading(schedule: Schedule, steps: int) -> torch.Tensor:
    return spacing_leading(_need_discrete(schedule, "leading"), steps)


def _trailing(schedule: Schedule, steps: int) -> torch.Tensor:
    return spacing_trailing(_need_discrete(schedule, "trailing"), steps)


def _linspace(schedule: Schedule, steps: int) -> torch.Tensor:
    return spacing_linspace(_need_discrete(schedule, "linspace"), steps)


def _lcm(schedule: Schedule, steps: int) -> torch.Tensor:
    return spacing_lcm(_need_discrete(schedule, "lcm"), steps)


def _karras(schedule: Schedule, steps: int) -> torch.Tensor:
    return spacing_karras(schedule.sigma_min, schedule.sigma_max, steps)


def _exponential(schedule: Schedule, steps: int) -> torch.Tensor:
    return spacing_exponential(schedule.sigma_min, schedule.sigma_max, steps)


SPACINGS: dict[str, Callable[[Schedule, int], torch.Tensor]] = {
    "normal": _normal,
    "karras": _karras,
    "exponential": _exponential,
    "leading": _leading,
    "trailing": _trailing,
    "linspace": _linspace,
    "lcm": _lcm,
}


def spacing(name: str, schedule: Schedule, steps: int) -> torch.Tensor:
    """Descending float32 sigmas, steps + 1 of them, the last exactly 0, by spacing name."""
    if name not in SPACINGS:
        raise ValueError(f"unknown sigma spacing {name!r}; choose from {', '.join(SPACINGS)}")
    return SPACINGS[name](schedule, steps)


def step_index(sigmas: torch.Tensor, sigma: torch.Tensor) -> int:
    """The sampler step a denoiser call belongs to: the last i with sigmas[i] ≥ sigma. A call at
    sigmas[i] is step i; calls between sigmas[i] and sigmas[i+1] (midpoints of second-order
    samplers) stay in step i, and Heun's second call, at sigmas[i+1], reads step i+1's contexts."""
    s = float(sigma.reshape(-1)[0])
    above = int((sigmas[:-1] >= s * (1 - 1e-6)).sum())
    return max(above - 1, 0)
