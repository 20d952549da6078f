"""The U-Net's cross-attention probabilities, recorded only while asked.

`cross_attention_maps(unet, sides)` hooks every spatial transformer (to learn its grid) and the
text cross-attention (`attn2`) of each of its blocks; while the context is open, each forward call
at a grid in `sides` appends softmax(q·kᵀ/√d) (B, heads, h·w, T) to the list of its (h, w). The
probabilities are recomputed from the layer's own q and k projections of the same inputs, so
they are exactly those SDPA used and their gradients reach the same weights, while the layer
itself still runs SDPA unchanged: the network's output is bit-identical with and without the
hooks, and outside the context nothing is hooked, so a run that never asks pays nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from marble.models.layers import SpatialTransformer


def attention_probabilities(attn: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, T) softmax of the scaled query-key products of a CrossAttention on x (B, N, C)
    and context (B, T, D), in float32 (SDPA's default scale 1/√head_dim)."""
    q, k = attn.to_q(x), attn.to_k(context)
    b, n, inner = q.shape
    dh = inner // attn.heads
    q = q.reshape(b, n, attn.heads, dh).transpose(1, 2).float()
    k = k.reshape(b, -1, attn.heads, dh).transpose(1, 2).float()
    return (q @ k.transpose(-1, -2) * dh ** -0.5).softmax(-1)


@contextmanager
def cross_attention_maps(unet: nn.Module, sides: set[tuple[int, int]]) -> Iterator[dict[tuple[int, int], list[torch.Tensor]]]:
    """Yield {(h, w): [probabilities of each cross-attention call at that grid, in call order]}
    for the grids in `sides`, filled by the forward passes run inside the context."""
    maps: dict[tuple[int, int], list[torch.Tensor]] = {s: [] for s in sides}
    grid: list[tuple[int, int]] = [(0, 0)]          # the grid of the transformer running now
    handles = []

    def enter(module, args):
        grid[0] = tuple(args[0].shape[-2:])

    def record(module, args, output):
        if grid[0] in maps:
            maps[grid[0]].append(attention_probabilities(module, args[0], args[1]))

    try:
        for module in unet.modules():
            if isinstance(module, SpatialTransformer):
                handles.append(module.register_forward_pre_hook(enter))
                handles.extend(block.attn2.register_forward_hook(record) for block in module.transformer_blocks)
        yield maps
    finally:
        for handle in handles:
            handle.remove()
