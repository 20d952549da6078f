"""Tiled VAE encode and decode (diffusers' `AutoencoderKL.enable_tiling()`), an opt-in.

The VAE's activations at full resolution are what peaks a large image's memory (SDXL at 1024²: ~4 GB
in float32, docs/bench.md). Tiling runs the encoder or decoder on overlapping square tiles, one at
a time, so the peak follows the tile's size instead of the image's. It is not the same image: each
tile's GroupNorm statistics (and the mid-block attention) see only that tile, so the tiles disagree
where they meet; the overlaps are cross-faded to hide the seams. diffusers' algorithm, step for step:

- tiles of `tile_in` (latent side for decode, pixels for encode) start every 3/4 of a tile in
  both directions (`tile_overlap_factor` 0.25), the last ones clipped by the image's edge;
- in raster order each output tile fades in from its upper neighbour over its first
  `extent = tile_out / 4` rows, then from its left neighbour over its first `extent` columns,
  with weights k/extent (k = 0 .. extent-1) on the tile and 1 - k/extent on the neighbour's
  last rows/columns (the neighbours already faded themselves);
- each tile keeps its top-left `tile_out - extent` square, and the kept squares are concatenated.

post_quant_conv / quant_conv run per tile (they are 1×1 convolutions: per pixel either way); the
latent scale and shift stay outside, as in `AutoencoderKL.encode/decode`. An image no larger than a
tile in both directions takes the untiled `vae.encode` / `vae.decode`, bit for bit.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from marble.models.weight_cast import compute_dtype

DEFAULT_TILE = 512      # pixels: diffusers' SD1.x tile (its VAE config's sample_size; SDXL's says 1024, which never tiles 1024²)
OVERLAP = 0.25          # diffusers' tile_overlap_factor


def check_tile_size(tile: int, latent_factor: int) -> int:
    """A tile side in pixels, or 0 = off; ValueError (one line) otherwise. A multiple of 4 latent
    cells, so that the tiles' stride (3/4 of a tile) and the kept squares line up exactly: with
    other sizes diffusers' arithmetic gives an image of the wrong size."""
    step = 4 * latent_factor
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0 or tile % step or tile > 16384:
        raise ValueError(f"the VAE tile size must be a multiple of {step} pixels up to 16384 (0 = off), got {tile!r}")
    return tile


def _fade_in(previous: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """In place: `tile`'s first `extent` lines along `dim` become (1 - k/extent)·previous's last
    lines + (k/extent)·tile's own (diffusers' blend_v for dim 2, blend_h for dim 3)."""
    n = min(previous.shape[dim], tile.shape[dim], extent)
    if n == 0:
        return
    shape = [1, 1, 1, 1]
    shape[dim] = n
    w = (torch.arange(n, dtype=torch.float64) / n).reshape(shape)   # k/n as Python computes it, then rounded once
    head = tile.narrow(dim, 0, n)
    head.copy_(previous.narrow(dim, previous.shape[dim] - n, n) * (1 - w).to(tile)
               + head * w.to(tile))


def _tiled(x: torch.Tensor, tile_in: int, tile_out: int, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`run` over overlapping tiles of `x` (side `tile_in`), its outputs (side `tile_out`) faded
    into each other and cropped: the module docstring's algorithm."""
    stride = int(tile_in * (1 - OVERLAP))
    extent = int(tile_out * OVERLAP)
    keep = tile_out - extent
    rows = [[run(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _fade_in(rows[i - 1][j], tile, extent, dim=2)
            if j > 0:
                _fade_in(row[j - 1], tile, extent, dim=3)
    return torch.cat([torch.cat([t[:, :, :keep, :keep] for t in row], dim=3) for row in rows], dim=2)


def tiled_decode(vae, latent: torch.Tensor, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """`vae.decode(latent)` in tiles of `tile` pixels (tile / factor latent cells); the untiled
    decode when the latent fits in one tile."""
    side = tile // vae.downsampling_factor
    if latent.shape[-1] <= side and latent.shape[-2] <= side:
        return vae.decode(latent)
    c = vae.config
    z = latent.to(compute_dtype(vae.post_quant_conv)) / c.scaling_factor + c.shift_factor
    return _tiled(z, side, tile, lambda t: vae.decoder(vae.post_quant_conv(t)))


def tiled_encode(vae, pixels: torch.Tensor, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """`vae.encode(pixels)` in tiles of `tile` pixels: the posterior's mean and log-variance are
    faded together (as diffusers' moments are), and the mean is scaled; the untiled encode when
    the image fits in one tile."""
    if pixels.shape[-1] <= tile and pixels.shape[-2] <= tile:
        return vae.encode(pixels)
    c = vae.config
    x = pixels.to(compute_dtype(vae.quant_conv))
    moments = _tiled(x, tile, tile // vae.downsampling_factor, lambda t: vae.quant_conv(vae.encoder(t)))
    mean = moments.chunk(2, dim=1)[0]
    return (mean - c.shift_factor) * c.scaling_factor


class TiledVAE(nn.Module):
    """A VAE whose `encode` and `decode` are tiled: the codec interface (and the weights, shared)
    of the VAE it wraps, for the pipeline's every encode and decode."""

    def __init__(self, vae: nn.Module, tile: int):
        super().__init__()
        self.vae, self.tile = vae, tile

    @property
    def downsampling_factor(self) -> int:
        return self.vae.downsampling_factor

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return tiled_encode(self.vae, pixels, self.tile)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return tiled_decode(self.vae, latent, self.tile)


def tiled(vae: nn.Module, tile: int) -> nn.Module:
    """The codec a request uses: the VAE itself (tile 0: off), else the VAE tiled."""
    return TiledVAE(vae, tile) if tile else vae
