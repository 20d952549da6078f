"""Training objectives as pure functions: randomness comes in as arguments.

Diffusion (Ho et al. 2020, "simple" loss): pick a discrete timestep t, noise the clean latent in
the VP view z = sqrt(ā_t)·x0 + sqrt(1 − ā_t)·eps, and regress the network's prediction onto eps
(or v = sqrt(ā)·eps − sqrt(1 − ā)·x0, Salimans & Ho 2022). This is the same correspondence the
sampler's `discrete_denoiser` inverts, so what is trained is what is sampled.

Rectified flow (Liu et al. 2022; Esser et al. 2024, SD3): x_t = (1 − t)·x0 + t·eps, regress the
velocity eps − x0, with t drawn logit-normal (SD3 §3.1: t = sigmoid(n), n ~ N(0, 1), its best
sampler of t), which spends the training on the middle times where the velocity is hardest to
predict. marble.diffusion.denoiser's flow_denoiser inverts the same parametrisation.

VAE (Rombach et al. 2022 §3 without the adversarial and perceptual terms, which a world of flat
shapes does not need): reconstruction + a small KL pulling q(z|x) toward N(0, I).
"""
from __future__ import annotations

from typing import Callable

import torch

from marble.diffusion.denoiser import FLOW_TIME_SCALE, add_noise_flow, add_noise_vp, v_from_x0_eps
from marble.diffusion.schedule import DiscreteSchedule


def diffusion_target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    if prediction == "eps":
        return eps
    if prediction == "v":
        return v_from_x0_eps(x0, eps, sigma)
    if prediction == "x0":
        return x0
    raise ValueError(f"unknown prediction {prediction!r}")


def min_snr_weight(prediction: str, sigma: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): cap each timestep's weight, measured as an x0
    loss, at SNR = γ so that low-noise steps stop dominating. SNR = ā/(1 − ā) = 1/σ². In eps
    units the weight is min(SNR, γ)/SNR, in v units min(SNR, γ)/(SNR + 1)."""
    snr = 1.0 / sigma.double() ** 2
    capped = torch.clamp(snr, max=gamma)
    weight = {"eps": capped / snr, "v": capped / (snr + 1), "x0": capped}[prediction]
    return weight.float()


def diffusion_loss(network: Callable[..., torch.Tensor], schedule: DiscreteSchedule, prediction: str,
                   x0: torch.Tensor, context: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                   min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Mean squared error of the prediction; x0 (B, C, h, w) latents, t (B,) integer timesteps,
    eps (B, C, h, w) standard normal noise. min_snr_gamma > 0 weights timesteps by Min-SNR-γ."""
    sigma = schedule.sigmas.to(x0.device)[t].to(x0.dtype)
    z = add_noise_vp(x0, sigma, eps)
    out = network(z, t.to(torch.float32), context=context)
    target = diffusion_target(prediction, x0, eps, sigma)
    per_sample = torch.mean((out.float() - target.float()) ** 2, dim=tuple(range(1, x0.ndim)))
    if min_snr_gamma > 0:
        per_sample = per_sample * min_snr_weight(prediction, sigma, min_snr_gamma)
    return per_sample.mean()


def logit_normal_t(normal: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """SD3's logit-normal time: t = sigmoid(mean + std·n), from standard normal draws n."""
    return torch.sigmoid(mean + std * normal)


def flow_loss(network: Callable[..., torch.Tensor], x0: torch.Tensor, context: torch.Tensor, t: torch.Tensor,
              eps: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the predicted velocity against eps − x0; x0 (B, C, h, w) latents,
    t (B,) in (0, 1), eps standard normal noise. The network sees FLOW_TIME_SCALE·t."""
    out = network(add_noise_flow(x0, t.to(x0.dtype), eps), FLOW_TIME_SCALE * t.float(), context=context)
    return torch.mean((out.float() - (eps - x0).float()) ** 2)


def vae_loss(vae: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]], pixels: torch.Tensor,
             eps: torch.Tensor, kl_weight: float = 1e-6) -> tuple[torch.Tensor, dict]:
    """Reconstruction (L1 + L2 on pixels in [-1, 1]) of a posterior sample, plus
    kl_weight · KL(q(z|x) || N(0, I)) per latent element. `vae(pixels, eps)` -> (recon, mean, logvar)."""
    recon, mean, logvar = vae(pixels, eps)
    recon, mean, logvar = recon.float(), mean.float(), logvar.float()
    l1 = (recon - pixels).abs().mean()
    l2 = ((recon - pixels) ** 2).mean()
    kl = 0.5 * torch.mean(mean ** 2 + logvar.exp() - 1.0 - logvar)
    return l1 + l2 + kl_weight * kl, {"l1": float(l1), "l2": float(l2), "kl": float(kl)}
