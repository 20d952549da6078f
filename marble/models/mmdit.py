"""A transformer denoiser with joint text-image attention: MMDiT (Esser et al. 2024, "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis", SD3 §4 and Fig. 2).

The latent is cut into p×p patches (64 tokens for a 16×16 latent and p = 2), each projected to
`width` and given a fixed 2-D sin-cos position (DiT, Peebles & Xie 2023). The text states are
projected to the same width. Every block runs one attention over the concatenation [text; image]
with separate weights per stream (the "MM" of MMDiT: each modality keeps its own QKV, output and
MLP), so image tokens read the prompt and each other in one softmax. Time and the pooled text
(the mean of the context tokens) form the conditioning vector that sets every LayerNorm's shift,
scale and residual gate (adaLN-Zero: the modulation layers start at zero, so every block starts as
the identity). The last block updates only the image stream (SD3's pre-only context block).

Same call as the U-Net, network(x, t, context) -> prediction (B, C, h, w), so it sits behind the
same denoiser wrappers; t is the network's time (see marble.diffusion.denoiser). Odd latent sides
are padded to the patch size and cropped back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from marble.models.layers import attention, position_embedding_2d, timestep_embedding
from marble.models.weight_cast import compute_dtype


@dataclass(frozen=True)
class MMDiTConfig:
    kind = "mmdit"                   # written into the model file; the U-Net config has no kind
    in_channels: int = 4             # latent channels
    out_channels: int = 4            # prediction channels
    patch_size: int = 2              # p: each token is a p×p patch of the latent
    width: int = 256                 # token width of both streams
    depth: int = 6                   # joint blocks
    heads: int = 4                   # attention heads (width / heads channels each)
    mlp_ratio: int = 4               # MLP hidden width = mlp_ratio × width
    context_dim: int = 384           # width of the text context (MiniLM: 384)
    time_dim: int = 256              # sinusoidal features of the time before its MLP
    position_reference: int = 16     # position code measured on this many cells per side (layers.position_embedding_2d)

    def __post_init__(self):
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width {self.width} must split into {self.heads} heads of an even size")
        if self.width % 4:
            raise ValueError(f"width {self.width} must be divisible by 4 for the 2-D position code")
        if self.patch_size < 1 or self.depth < 1:
            raise ValueError("patch_size and depth must be >= 1")

    @property
    def adm_in_channels(self) -> int:
        """No vector conditioning y (the U-Net's label_emb): the pooled text comes from the context."""
        return 0


MMDIT_PRESETS: dict[str, MMDiTConfig] = {
    "tiny": MMDiTConfig(width=32, depth=2, heads=2, context_dim=32, time_dim=32),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x·(1 + scale) + shift, one (shift, scale) per batch item broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class StreamIn(nn.Module):
    """One stream's half of a joint block before the attention: adaLN, then q, k, v."""

    def __init__(self, width: int, pre_only: bool):
        super().__init__()
        self.n_mod = 2 if pre_only else 6   # (shift, scale) for attention, then (gate, shift, scale, gate)
        self.adaLN = nn.Linear(width, self.n_mod * width)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor):
        mods = self.adaLN(F.silu(cond)).chunk(self.n_mod, dim=-1)
        q, k, v = self.qkv(modulate(self.norm1(x), mods[0], mods[1])).chunk(3, dim=-1)
        return q, k, v, mods[2:]


class StreamOut(nn.Module):
    """One stream's half after the attention: gated output projection, then the gated adaLN MLP."""

    def __init__(self, width: int, mlp_ratio: int):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, attended: torch.Tensor, mods) -> torch.Tensor:
        gate1, shift2, scale2, gate2 = mods
        x = x + gate1[:, None] * self.proj(attended)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class JointBlock(nn.Module):
    """MMDiT block (SD3 Fig. 2b): both streams modulated by the conditioning, one attention over
    [context; image] tokens, each stream's own output and MLP. `last`: the context is only read."""

    def __init__(self, c: MMDiTConfig, last: bool):
        super().__init__()
        self.heads = c.heads
        self.image_in, self.image_out = StreamIn(c.width, False), StreamOut(c.width, c.mlp_ratio)
        self.context_in = StreamIn(c.width, last)
        self.context_out = None if last else StreamOut(c.width, c.mlp_ratio)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, cond: torch.Tensor):
        qx, kx, vx, mods_x = self.image_in(x, cond)
        qc, kc, vc, mods_c = self.context_in(ctx, cond)
        n = ctx.shape[1]
        joint = attention(torch.cat([qc, qx], 1), torch.cat([kc, kx], 1), torch.cat([vc, vx], 1), self.heads)
        x = self.image_out(x, joint[:, n:], mods_x)
        ctx = ctx if self.context_out is None else self.context_out(ctx, joint[:, :n], mods_c)
        return x, ctx


class MMDiT(nn.Module):
    """network(x, t, context) -> prediction; x (B, C, h, w), t (B,) network time (fractional),
    context (B, T, context_dim)."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = c = config
        p = c.patch_size
        self.patch_embed = nn.Conv2d(c.in_channels, c.width, p, stride=p)
        self.context_embed = nn.Linear(c.context_dim, c.width)
        self.time_embed = nn.Sequential(nn.Linear(c.time_dim, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.pooled_embed = nn.Sequential(nn.Linear(c.context_dim, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.blocks = nn.ModuleList(JointBlock(c, last=i == c.depth - 1) for i in range(c.depth))
        self.final_adaLN = nn.Linear(c.width, 2 * c.width)
        self.final_norm = nn.LayerNorm(c.width, elementwise_affine=False, eps=1e-6)
        self.final = nn.Linear(c.width, p * p * c.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier linears, and zero on every adaLN modulation and on the
        output layer (adaLN-Zero), so the network starts as the zero function of identity blocks."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in [self.final_adaLN, self.final] + [s.adaLN for b in self.blocks for s in (b.image_in, b.context_in)]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def downsampling_factor(self) -> int:
        return 1      # any latent side works (padded to the patch size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                concat: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        if concat is not None or y is not None:
            raise ValueError("this MMDiT takes no extra input channels and no vector conditioning y")
        c, p = self.config, self.config.patch_size
        dtype = compute_dtype(self.patch_embed)
        x = x.to(dtype)       # samplers keep float32 state; the network runs in its own dtype
        b, _, h, w = x.shape
        x = F.pad(x, (0, -w % p, 0, -h % p))
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)           # (B, gh·gw, width), row-major
        tokens = tokens + position_embedding_2d(gh, gw, c.width, c.position_reference).to(tokens.device, dtype)
        context = context.to(dtype)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        cond = self.time_embed(timestep_embedding(t, c.time_dim).to(dtype)) + self.pooled_embed(context.mean(1))
        ctx = self.context_embed(context)
        for block in self.blocks:
            tokens, ctx = block(tokens, ctx, cond)
        shift, scale = self.final_adaLN(F.silu(cond)).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(tokens), shift, scale))             # (B, gh·gw, p·p·C)
        out = out.reshape(b, gh, gw, p, p, c.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, c.out_channels, gh * p, gw * p)[:, :, :h, :w]
