"""TokenCompose's grounding losses on cross-attention maps (Wang et al., CVPR 2024, §3.2), pure.

The cross-attention of a U-Net pixel u over the text tokens is a softmax, A[u, t], summing to 1
over t. For a group named in the caption (its noun's word pieces and its colour word) and its
binary mask M:

- token loss, per token t of the group: (1 − Σ_u A[u, t]·M[u] / Σ_u A[u, t])², the share of the
  token's map that falls outside the object, squared as in TokenCompose; the heads' shares are
  averaged before squaring (TokenCompose's mean over its batch×heads axis), the squares averaged
  over the group's tokens, the layers and the groups. Each sample is its own term (TokenCompose
  averages over the batch before squaring, which ties samples together and would make DDP's
  result depend on the split).
- pixel loss: binary cross-entropy, per pixel, between the group's map, Σ_{t in group} A[u, t]
  averaged over heads and layers (already a probability: the share of pixel u's attention that
  reads the group's words), and M[u]; TokenCompose's variant, since A needs no normalising to be a
  probability. Averaged over pixels and groups.

Groups without tokens (generic captions, dropped captions, a scene's missing second group) are
left out; with none left both terms are 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_masks(masks: torch.Tensor, side: int) -> torch.Tensor:
    """(B, G, s, s) bool masks at a coarser side × side grid: a cell is inside when any finer cell is
    (the "> 0" of TokenCompose's resized masks); s must be a multiple of side."""
    s = masks.shape[-1]
    if s % side:
        raise ValueError(f"masks of side {s} do not pool to {side}")
    if s == side:
        return masks
    b, g = masks.shape[:2]
    return F.max_pool2d(masks.reshape(b * g, 1, s, s).float(), s // side).reshape(b, g, side, side) > 0


def _group_maps(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, H, N, T) probabilities -> (B, H, N, G, K) maps of each group's tokens (index -1 reads
    token 0; callers mask those out)."""
    b, h, n, _ = probs.shape
    g, k = tokens.shape[1:]
    idx = tokens.clamp(min=0).reshape(b, 1, 1, g * k).expand(b, h, n, g * k)
    return torch.gather(probs, 3, idx).reshape(b, h, n, g, k)


def grounding_loss(probs: list[torch.Tensor], masks: torch.Tensor, tokens: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token loss, pixel loss) at one resolution. probs: the cross-attention probabilities of
    each layer there, (B, heads, N, T) with N = h·w pixels in row-major order; masks (B, G, h, w)
    bool; tokens (B, G, K) integer context positions of each group's words, -1 = none."""
    probs = [p.to(torch.promote_types(p.dtype, torch.float32)) for p in probs]   # bf16/fp16 maps in float32
    b, g, k = tokens.shape
    real = tokens >= 0                                               # (B, G, K)
    named = real.any(-1)                                             # (B, G)
    count = named.sum().clamp(min=1)
    inside = masks.reshape(b, g, -1).to(probs[0].dtype).transpose(1, 2)   # (B, N, G)

    per_layer = []
    for p in probs:
        maps = _group_maps(p, tokens)                        # (B, H, N, G, K)
        share = (maps * inside[:, None, :, :, None]).sum(2) / maps.sum(2)   # (B, H, G, K)
        per_layer.append((1 - share.mean(1)) ** 2)                   # (B, G, K)
    squares = torch.stack(per_layer).mean(0)
    per_group = (squares * real).sum(-1) / real.sum(-1).clamp(min=1)
    token = (per_group * named).sum() / count

    mean_map = torch.stack([p.mean(1) for p in probs]).mean(0)              # (B, N, T)
    group_map = (_group_maps(mean_map[:, None], tokens)[:, 0] * real[:, None]).sum(-1)  # (B, N, G)
    bce = F.binary_cross_entropy(group_map.clamp(0, 1), inside, reduction="none").mean(1)   # (B, G)
    pixel = (bce * named).sum() / count
    return token, pixel
