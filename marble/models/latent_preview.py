"""Cheap previews: a linear map from a latent to RGB (ComfyUI's "Latent2RGB").

Each latent pixel becomes rgb = latent · M + b, M of shape (C, 3), at the latent's resolution, in
the pixel range [-1, 1]. The latent is the one the sampler walks (the VAE's, times its scaling
factor), as ComfyUI's previews read x0. It costs C·3 multiply-adds a latent pixel against a VAE
decode's millions, and shows colours and layout, not detail.

M and b are fitted by least squares (`fit_latent_rgb`): latents of real images against the VAE's
own decode of them, downsampled to latent resolution. marble's built-in model is fitted here
(benchmarks/fit_latent_rgb.py reproduces the numbers, tests/test_latent_preview.py refits them);
SD1.x/2.x and SDXL, whose weights are not available here, take ComfyUI's published factors.
A VAE is recognised by its latent scaling factor: SD's 0.18215 and SDXL's 0.13025 are fixed by
their papers' recipes, and the built-in's was measured from its own latents, so it names that VAE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LatentRGB:
    factors: tuple[tuple[float, float, float], ...]   # M: one (R, G, B) row per latent channel
    bias: tuple[float, float, float]                   # b
    source: str                                        # where the numbers come from

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latent -> (B, 3, h, w) pixels in [-1, 1]."""
        m = torch.tensor(self.factors, dtype=latent.dtype, device=latent.device)
        b = torch.tensor(self.bias, dtype=latent.dtype, device=latent.device)
        return (torch.einsum("bchw,cr->brhw", latent, m) + b[:, None, None]).clamp(-1, 1)


def fit_latent_rgb(latents: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares M (C, 3) and b (3,) for pixels ≈ latent · M + b, each latent pixel against the
    mean of the image pixels it covers (area downsampling by the latent factor). float64."""
    factor = pixels.shape[-1] // latents.shape[-1]
    target = F.avg_pool2d(pixels.to(torch.float64), factor)                   # (N, 3, h, w)
    x = latents.to(torch.float64).permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), y).solution
    return solution[:-1], solution[-1]


@torch.inference_mode()
def fit_from_vae(vae, pixels: torch.Tensor, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """M and b for a VAE: its latents of `pixels` (N, 3, H, W) in [-1, 1] against its own decode of
    them, so the map imitates the decoder the preview stands in for."""
    latents, decoded = [], []
    for chunk in pixels.split(batch):
        z = vae.encode(chunk.float())
        latents.append(z)
        decoded.append(vae.decode(z).clamp(-1, 1))
    return fit_latent_rgb(torch.cat(latents), torch.cat(decoded))


COMFYUI = "ComfyUI comfy/latent_formats.py (commit 040a324)"

LATENT_RGB: dict[float, LatentRGB] = {   # by the VAE's latent scaling factor
    0.18215: LatentRGB(   # SD1.x and SD2.x share the VAE; ComfyUI's SD15 format, no bias
        ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
        (0.0, 0.0, 0.0), f"{COMFYUI}, SD15"),
    0.13025: LatentRGB(   # SDXL's VAE
        ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
        (0.1084, -0.0175, -0.0011), f"{COMFYUI}, SDXL"),
    # marble's built-in model: benchmarks/fit_latent_rgb.py (256 shapes-world images, seed 0); RMS error
    # 0.184 against its VAE's decode at latent resolution, where the pixels spread 0.359 (74% of the variance)
    0.3550877571105957: LatentRGB(
        ((0.2345, 0.1853, 0.4407), (0.7360, 0.8898, 0.2843), (0.3267, 0.3107, 0.0422), (-0.2166, -0.4865, -0.5746)),
        (0.5824, 0.7637, 0.9054), "fitted here on the built-in VAE (benchmarks/fit_latent_rgb.py)"),
}


def latent_rgb_for(vae_config) -> LatentRGB | None:
    """The linear previewer for a VAE (marble.models.vae.VAEConfig), or None where none is known."""
    entry = LATENT_RGB.get(vae_config.scaling_factor)
    if entry is None or len(entry.factors) != vae_config.z_channels:
        return None
    return entry
