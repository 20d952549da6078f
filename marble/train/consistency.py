"""Latent consistency distillation (LCD; Luo et al. 2023, "Latent Consistency Models", Alg. 1) as
pure functions: randomness and networks come in as arguments.

A consistency function f(x, σ) maps every point of a probability-flow ODE trajectory to its
endpoint. LCD learns it from a teacher denoiser: take x_t = x0 + σ_t·eps, move it one *skipping*
step t → s = t − k along the teacher's ODE with a DDIM step (the teacher guided by CFG, so the
student learns the guided ODE and needs no CFG of its own), and pull f_θ(x_t, t) toward
f_θ⁻(x_s, s) of an EMA "target" copy of the student. The boundary f(x, 0) = x is built in through
c_skip, c_out (Song et al. 2023 §3, with LCM's timestep scaling), so the chain of targets ends
at data.

Phased consistency (PCM; Wang et al. 2024, and Heek et al. 2024's multistep consistency models)
splits the trajectory into phases at the timesteps a few-step sampler visits and learns, within each
phase, the map to the phase's lower edge instead of to data: f(x, t) = DDIM from x_t to σ_edge with
the consistency estimate of x0. Deterministic DDIM/Euler sampling then steps edge to edge. With one
phase σ_edge = 0 and f is LCD's, bit for bit.

All in the VE view the samplers use (x = x0 + σ·eps); denoisers follow the contract D(x, σ) -> x0.
"""
from __future__ import annotations

from typing import Callable

import torch

from marble.diffusion.denoiser import broadcast_sigma
from marble.diffusion.schedule import timesteps_lcm

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # D(x, σ) -> x0, context closed over

SIGMA_DATA = 0.5        # LCM's σ_data for c_skip / c_out
TIMESTEP_SCALING = 10.0  # diffusers' LCM timestep_scaling: c_skip ≈ 0 from t ≈ 5 on, so f ≈ D away from t = 0


def skipping_grid(num_timesteps: int, solver_steps: int) -> torch.Tensor:
    """The teacher solver's timesteps, ascending: t_i = (i + 1)·k − 1 with k = T / solver_steps
    (LCM's DDIM grid; T = 1000, 50 steps: 19, 39, ..., 999). A step goes t_i → max(t_i − k, 0)."""
    if solver_steps < 1 or num_timesteps % solver_steps:
        raise ValueError(f"solver_steps must divide the {num_timesteps} timesteps, got {solver_steps}")
    k = num_timesteps // solver_steps
    return torch.arange(1, solver_steps + 1) * k - 1


def phase_edges(num_timesteps: int, solver_steps: int, phases: int) -> torch.Tensor:
    """PCM's phase edges, ascending, without the top: the LCM spacing's timesteps at `phases` steps
    on the solver's grid (4 phases on 50 steps: 259, 499, 759), so that DDIM/Euler sampling on that
    spacing at `phases` steps starts each step on an edge. Below the lowest edge lies data (σ = 0)."""
    if phases < 1 or phases > solver_steps:
        raise ValueError(f"phases must be in 1..{solver_steps} (the solver's steps), got {phases}")
    t = timesteps_lcm(num_timesteps, phases, solver_steps)[1:][::-1]
    return torch.from_numpy(t.copy())


def edge_sigmas(sigmas: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """σ of the phase edge below every timestep t (T,): the largest edge < t, or 0 (data) below the
    lowest, so an edge itself belongs to the phase above it (t = 759 maps to 499). Index it by t."""
    below = torch.searchsorted(edges, torch.arange(len(sigmas)))     # how many edges are < t
    return torch.cat([sigmas.new_zeros(1), sigmas[edges]])[below]


def boundary(t: torch.Tensor, sigma_data: float = SIGMA_DATA,
             scaling: float = TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t), c_out(t) (LCM eq. 9 with diffusers' scaling): c_skip(0) = 1, c_out(0) = 0, so
    f(x, 0) = x exactly; for t ≥ 19 (the grid's first step) c_skip < 1e-5."""
    scaled = t.double() * scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2).sqrt()
    return c_skip.float(), c_out.float()


def consistency(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """f(x, σ) = c_skip(t)·x + c_out(t)·D(x, σ); σ, t (B,) the level and its timestep."""
    c_skip, c_out = boundary(t)
    return broadcast_sigma(c_skip.to(x), x) * x + broadcast_sigma(c_out.to(x), x) * denoiser(x, sigma)


def phased(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor,
           sigma_edge: torch.Tensor | None) -> torch.Tensor:
    """PCM's f(x, t): the consistency estimate of x0 taken by DDIM from σ to the phase edge σ_edge
    (B,). None is `consistency` itself (one phase: LCD), as is σ_edge = 0, exactly; σ_edge = σ gives
    x (the phase's boundary)."""
    x0 = consistency(denoiser, x, sigma, t)
    return x0 if sigma_edge is None else ddim_step(x, x0, sigma, sigma_edge.to(sigma))


def ddim_step(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (η = 0) from σ to σ_next given the x0 estimate: in the VE view it
    is x0 + (x − x0)·σ_next/σ (Karras et al. 2022 §3: DDIM is Euler in σ)."""
    ratio = broadcast_sigma(sigma_next / sigma, x)
    return x0 + (x - x0) * ratio


def huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber distance sqrt(d² + c²) − c per element, mean over all (Song & Dhariwal 2023;
    LCM-SD uses c = 0.001); c = 0 is the mean absolute error. Per sample: (B,)."""
    d = (a.float() - b.float()) ** 2
    return (torch.sqrt(d + c * c) - c).mean(dim=tuple(range(1, a.ndim)))


def lcd_target(target: Denoiser, teacher: Denoiser, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
               s: torch.Tensor, sigmas: torch.Tensor,
               sigma_edge: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The no-gradient half of LCD: x_t = x0 + σ_t·eps, the guided teacher's DDIM step to x_s and
    the EMA target's f_θ⁻(x_s, s), taken to t's phase edge σ_edge (B,; None = data, plain LCD).
    Returns (x_t, σ_t, y); the student is then pulled to y at x_t."""
    sigma_t, sigma_s = sigmas[t].to(x0), sigmas[s].to(x0)
    x_t = x0 + broadcast_sigma(sigma_t, x0) * eps
    with torch.no_grad():
        x_s = ddim_step(x_t, teacher(x_t, sigma_t), sigma_t, sigma_s)
        y = phased(target, x_s, sigma_s, s, sigma_edge)
    return x_t, sigma_t, y


def lcd_loss(student: Denoiser, target: Denoiser, teacher: Denoiser, x0: torch.Tensor, eps: torch.Tensor,
             t: torch.Tensor, s: torch.Tensor, sigmas: torch.Tensor, huber_c: float = 0.001,
             sigma_edge: torch.Tensor | None = None) -> torch.Tensor:
    """The LCD loss (Luo et al. 2023 eq. 11) for a batch; with σ_edge (B,) PCM's phased loss.

    x0 (B, C, h, w) clean latents; eps standard normal like x0; t, s (B,) integer timesteps with
    s < t (one skipping step); sigmas the schedule's σ per timestep. `teacher` is the guided teacher
    (CFG closed over), `target` the EMA student; neither receives gradients. Returns the mean
    pseudo-Huber distance d(f_θ(x_t, t), f_θ⁻(x_s, s)) with x_s the teacher's DDIM step.
    """
    x_t, sigma_t, y = lcd_target(target, teacher, x0, eps, t, s, sigmas, sigma_edge)
    return huber(phased(student, x_t, sigma_t, t, sigma_edge), y, huber_c).mean()
