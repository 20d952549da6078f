"""Fit the built-in model's linear latent-to-RGB previewer (marble.models.latent_preview).

Renders `--n` shapes-world images (train split, `--seed`), encodes them with the model's VAE,
decodes the latents again, and solves least squares for pixels ≈ latent · M + b at latent
resolution. Prints M and b as the Python literal latent_preview.LATENT_RGB holds, and how close
the map comes to the VAE's decode (RMS error in [-1, 1] pixel units, against the spread of the
pixels themselves).

    python benchmarks/fit_latent_rgb.py [--model builtin] [--n 256] [--seed 0]

tests/test_latent_preview.py refits with these defaults and checks the shipped numbers.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from marble.checkpoints.resolve import load_model
from marble.data.shapes import render_dataset
from marble.models.latent_preview import fit_from_vae


def shapes_pixels(n: int, seed: int, size: int) -> torch.Tensor:
    images, _ = render_dataset(n, split="train", seed=seed, size=size)
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)


def fit(model: str = "builtin", n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """M, b and the fit's quality for a model's VAE on n shapes-world images at its default size."""
    m = load_model(model).model
    pixels = shapes_pixels(n, seed, m.config.default_width)
    factors, bias = fit_from_vae(m.vae, pixels)
    with torch.inference_mode():
        latents = m.vae.encode(pixels)
        target = F.avg_pool2d(m.vae.decode(latents).clamp(-1, 1).double(), m.latent_factor)
    preview = torch.einsum("bchw,cr->brhw", latents.double(), factors) + bias[:, None, None]
    quality = {"rms_error": (preview.clamp(-1, 1) - target).pow(2).mean().sqrt().item(),
               "rms_spread": (target - target.mean((0, 2, 3), keepdim=True)).pow(2).mean().sqrt().item()}
    return factors, bias, quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    factors, bias, quality = fit(args.model, args.n, args.seed)
    rows = ", ".join("(" + ", ".join(f"{v:.4f}" for v in row) + ")" for row in factors.tolist())
    print(f"factors: ({rows})")
    print("bias: (" + ", ".join(f"{v:.4f}" for v in bias.tolist()) + ")")
    print(f"RMS error against the VAE decode at latent resolution: {quality['rms_error']:.4f} "
          f"(the pixels' own RMS spread: {quality['rms_spread']:.4f})")


if __name__ == "__main__":
    main()
