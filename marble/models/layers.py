"""Blocks shared by the U-Net and the VAE.

Names and structure follow the CompVis latent-diffusion code that the original Stable Diffusion
weights were saved from (`ldm/modules/diffusionmodules/openaimodel.py`, `attention.py`,
`model.py`), so those weights load by key copy.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, as ldm does: fp16/bf16 statistics
    over large spatial maps lose too much precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def normalization(channels: int, groups: int = 32, eps: float = 1e-5) -> GroupNorm32:
    return GroupNorm32(groups, channels, eps=eps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [cos | sin] halves
    (Vaswani et al. 2017; ldm's layout, i.e. diffusers' flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def position_embedding_2d(h: int, w: int, dim: int, reference: int = 16) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of an h×w grid, (h·w, dim) in row-major token order
    (ViT/MAE, Dosovitskiy et al. 2021; DiT): half the channels encode the row, half the column,
    each as `timestep_embedding` of the cell centre. Positions are measured on a `reference`-cell
    grid whatever the resolution ((i + 0.5)·reference/h), so a place in the image keeps its code at
    every U-Net level and at every latent size."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs channels divisible by 4, got {dim}")
    rows = (torch.arange(h, dtype=torch.float32) + 0.5) * (reference / h)
    cols = (torch.arange(w, dtype=torch.float32) + 0.5) * (reference / w)
    ey = timestep_embedding(rows, dim // 2)[:, None, :].expand(h, w, dim // 2)
    ex = timestep_embedding(cols, dim // 2)[None, :, :].expand(h, w, dim // 2)
    return torch.cat([ey, ex], dim=-1).reshape(h * w, dim)


def coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w): the x and y coordinate of each cell centre in [-1, 1] (CoordConv, Liu et al.
    2018), to concatenate to a feature map so convolutions know where they are."""
    b, _, h, w = x.shape
    ys = (torch.arange(h, dtype=x.dtype, device=x.device) + 0.5) * (2 / h) - 1
    xs = (torch.arange(w, dtype=x.dtype, device=x.device) + 0.5) * (2 / w) - 1
    grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])
    return grid[None].expand(b, 2, h, w)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              bias: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Multi-head attention over (B, N, heads*dh) tensors through SDPA (flash / memory-efficient
    kernels where the backend has them). With `bias`, the scaled scores (B, heads, N, T), in float32,
    pass through it before the softmax: the explicit product, for the calls a modulation asks for
    (marble.adapters.regions)."""
    b, n, inner = q.shape
    dh = inner // heads
    q, k, v = (z.reshape(b, -1, heads, dh).transpose(1, 2) for z in (q, k, v))
    if bias is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = bias(q.float() @ k.float().transpose(-1, -2) * dh ** -0.5).softmax(-1).to(v.dtype) @ v
    return out.transpose(1, 2).reshape(b, n, inner)


class CrossAttention(nn.Module):
    """Scaled dot-product attention; self-attention when `context` is None. `score_bias`: None, or
    scores -> scores before the softmax, set around a call by marble.adapters.regions."""

    score_bias = None

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads,
                                     self.score_bias))


class GEGLU(nn.Module):
    """Gated GELU feed-forward input (Shazeer 2020): x · GELU(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return x * F.gelu(gate)
        # without autograd, one wide tensor fewer (SDXL at 1024²: 84 MB a level-1 block): g·x is x·g
        return F.gelu(gate).mul_(x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention over the text context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, head_dim, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, merge=None) -> torch.Tensor:
        if merge is None:
            x = x + self.attn1(self.norm1(x))
        else:   # token merging (marble.models.tome): self-attention over fewer tokens, copied back
            merged, unmerge = merge
            x = x + unmerge(self.attn1(merged(self.norm1(x))))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on text through cross-attention.
    SD1 projects in/out with 1×1 convolutions, SD2 with linear layers (`linear_projection`).
    `position`: add a fixed 2-D sin-cos embedding to the tokens after the input projection, so
    self-attention, cross-attention queries and the feed-forward all see where each token is.
    `token_merge`: None, or (tokens, h, w) -> (merge, unmerge) or None for each block's
    self-attention, set for a request by marble.models.tome."""

    token_merge = None

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int, depth: int = 1,
                 linear_projection: bool = False, groups: int = 32, dropout: float = 0.0, position: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.linear_projection = linear_projection
        self.position = position
        self.norm = normalization(channels, groups, eps=1e-6)
        if linear_projection:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim, dropout) for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if self.linear_projection:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, c))
        else:
            x = self.proj_in(x)
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, x.shape[1])
        if self.position:
            x = x + position_embedding_2d(h, w, x.shape[-1]).to(x.device, x.dtype)
        for block in self.transformer_blocks:
            x = block(x, context) if self.token_merge is None else block(x, context, self.token_merge(x, h, w))
        if self.linear_projection:
            x = self.proj_out(x).reshape(b, h, w, c).permute(0, 3, 1, 2)
        else:
            x = self.proj_out(x.reshape(b, h, w, -1).permute(0, 3, 1, 2))
        return x + x_in


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # `size` matches the skip connection when a side was odd on the way down
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialised output layers make each residual branch start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
