"""Injected randomness: one generator per batch item.

Image i of a batch draws every random number from its own generator seeded `seed + i`,
so it is bit-identical to a single run with that seed. Noise is always drawn on the CPU
in float32 and then moved, so a seed means the same thing on every device.
"""
from __future__ import annotations

import torch

SEED_MAX = 2**32 - 1  # A1111 and diffusers seeds are 32-bit unsigned


class NoiseSource:
    """Draws standard normal noise shaped like a batch, item i from generator i."""

    def __init__(self, seeds: list[int]):
        if not seeds:
            raise ValueError("NoiseSource needs at least one seed")
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator(device="cpu").manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise with the shape, dtype and device of `like` (batch first)."""
        return self.randn(tuple(like.shape), device=like.device, dtype=like.dtype)

    def randn(self, shape: tuple[int, ...], device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Noise of an explicit shape (batch first), e.g. the initial latent."""
        if shape[0] != len(self.generators):
            raise ValueError(f"batch of {shape[0]} but {len(self.generators)} generators")
        noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32)
                             for g in self.generators])
        return noise.to(device=device, dtype=dtype)
