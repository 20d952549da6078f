"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable
Diffusion", arXiv 2303.17604; ToMe, Bolya et al. 2023).

Before self-attention in the highest-resolution transformer blocks, a fraction `ratio` of the
tokens is merged into similar ones (bipartite soft matching with a random 2×2-stride partition,
the paper's §3-4), attention runs over the fewer tokens, and its output is copied back to every
merged token ("unmerging"). Cross-attention and the feed-forward keep all tokens (the paper's
default: merging attention alone gave the best speed for its quality).

The random partition draws from a generator seeded with the image's seed, so an image is
reproducible and image i of a batch equals a single run with seed + i. An approximation, off by
default (ratio 0); its measured cost is in docs/bench.md.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from marble.models.layers import SpatialTransformer
from marble.models.unet import UNet

MAX_RATIO = 0.75   # the 2×2 partition has 3 source tokens per destination: at most 3/4 of them can merge

Merge = Callable[[torch.Tensor], torch.Tensor]


def bipartite_merge(metric: torch.Tensor, h: int, w: int, r: int, generator: torch.Generator
                    ) -> tuple[Merge, Merge]:
    """(merge, unmerge) for tokens (B, h·w, C) in row-major order. One token of each 2×2 cell,
    drawn at random, is a destination (set B), the rest are sources (set A); each source's most
    cosine-similar destination is its match, and the `r` best-matched sources are averaged into
    their destinations (ToMe's bipartite soft matching). `unmerge` gives every merged source its
    destination's value back. The partition is shared by the batch; the matching is per item."""
    b, n, _ = metric.shape
    hs, ws = h // 2, w // 2
    choice = torch.randint(4, (hs, ws, 1), generator=generator, device=generator.device).to(metric.device)
    cells = torch.zeros(hs, ws, 4, dtype=torch.int64, device=metric.device).scatter_(2, choice, -1)
    grid = torch.zeros(h, w, dtype=torch.int64, device=metric.device)   # odd edges stay sources
    grid[:hs * 2, :ws * 2] = cells.view(hs, ws, 2, 2).transpose(1, 2).reshape(hs * 2, ws * 2)
    order = grid.reshape(1, n, 1).argsort(dim=1, stable=True)   # destinations (-1) first
    dst_count = hs * ws
    b_idx, a_idx = order[:, :dst_count], order[:, dst_count:]
    r = min(r, a_idx.shape[1])

    unit = metric / metric.norm(dim=-1, keepdim=True)
    a = unit.gather(1, a_idx.expand(b, -1, unit.shape[-1]))
    bb = unit.gather(1, b_idx.expand(b, -1, unit.shape[-1]))
    best, match = (a @ bb.transpose(-1, -2)).max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)[..., None]
    kept, merged = ranked[:, r:], ranked[:, :r]           # sources kept apart / merged away
    target = match[..., None].gather(1, merged)           # each merged source's destination

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        src = x.gather(1, a_idx.expand(b, -1, c))
        dst = x.gather(1, b_idx.expand(b, -1, c))
        keep = src.gather(1, kept.expand(-1, -1, c))
        dst = dst.scatter_reduce(1, target.expand(-1, -1, c), src.gather(1, merged.expand(-1, -1, c)),
                                 reduce="mean")
        return torch.cat([keep, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        keep, dst = x[:, :kept.shape[1]], x[:, kept.shape[1]:]
        out = x.new_zeros(b, n, c)
        out.scatter_(1, b_idx.expand(b, -1, c), dst)
        out.scatter_(1, a_idx.expand(b, -1, c).gather(1, kept.expand(-1, -1, c)), keep)
        out.scatter_(1, a_idx.expand(b, -1, c).gather(1, merged.expand(-1, -1, c)),
                     dst.gather(1, target.expand(-1, -1, c)))
        return out

    return merge, unmerge


def highest_resolution_transformers(unet: UNet) -> list[SpatialTransformer]:
    """The spatial transformers of the highest-resolution level that has any (ToMe for SD's
    max_downsample = 1 on SD1/SD2; level 1 on SDXL, whose first level has no attention), found
    by the U-Net's construction order: each level's input blocks, then its output blocks."""
    c = unet.config
    level = min(c.attention_levels)
    last = len(c.channel_mult) - 1
    down = [None]   # input block 0 is the input convolution
    for lv in range(last + 1):
        down += [lv] * c.num_res_blocks + ([lv] if lv != last else [])
    up = [lv for lv in reversed(range(last + 1)) for _ in range(c.num_res_blocks + 1)]
    blocks = [blk for blk, lv in zip(unet.input_blocks, down) if lv == level]
    blocks += [blk for blk, lv in zip(unet.output_blocks, up) if lv == level]
    if level == last:
        blocks.append(unet.middle_block)
    return [m for blk in blocks for m in blk if isinstance(m, SpatialTransformer)]


@contextmanager
def token_merging(unet, ratio: float, seed: int) -> Iterator[None]:
    """Within the block, the highest-resolution transformers merge `ratio` of their tokens before
    self-attention, with partitions drawn from a generator seeded with `seed`. ratio 0: nothing
    changes (the exact network)."""
    if not 0.0 <= ratio <= MAX_RATIO:
        raise ValueError(f"the ToMe ratio must be in [0, {MAX_RATIO}], got {ratio}")
    if ratio == 0.0:
        yield
        return
    if not isinstance(unet, UNet):
        raise ValueError("ToMe needs a U-Net (this model's denoiser is a transformer)")
    generator = torch.Generator(device=next(unet.parameters()).device).manual_seed(seed)

    def pair(x: torch.Tensor, h: int, w: int) -> tuple[Merge, Merge] | None:
        r = int(x.shape[1] * ratio)
        if r == 0 or h < 2 or w < 2:   # nothing to merge, or no 2×2 cell to draw a destination from
            return None
        return bipartite_merge(x, h, w, r, generator)

    targets = highest_resolution_transformers(unet)
    for st in targets:
        st.token_merge = pair
    try:
        yield
    finally:
        for st in targets:
            st.token_merge = None
