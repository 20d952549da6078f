"""DeepCache: reuse the U-Net's deep features across sampler steps (Ma et al. 2023, "DeepCache:
Accelerating Diffusion Models for Free", arXiv 2312.00858).

Between neighbouring steps the high-level features that the deep branch hands to the shallowest
skip level change little. A "cache" step runs the whole U-Net and keeps the up path's features just
before they meet that skip; the `interval − 1` steps after it run only the shallow encoder block(s)
and the last decoder block(s) on top of the kept features (the paper's "partial inference"; its
uniform 1:N strategy). Cache steps are the full network, bit for bit.

An approximation, off by default (interval 1); its measured cost is in docs/bench.md.
"""
from __future__ import annotations

import torch

from marble.diffusion.denoiser import Denoiser
from marble.diffusion.schedule import step_index
from marble.models.unet import UNet

MAX_INTERVAL = 100   # steps per cache refresh; past a handful the image departs far from the exact one


class DeepCache:
    """The two passes over one U-Net: `full` (the network, keeping the deep features) and
    `shallow` (the first `branch` input blocks and the last `branch` output blocks around the kept
    features). branch 1 (the paper's shallowest): the input convolution on the way down, the last
    level's last block on the way up."""

    def __init__(self, unet: UNet, branch: int = 1):
        if not 1 <= branch < len(unet.output_blocks):
            raise ValueError(f"the DeepCache branch must be in [1, {len(unet.output_blocks) - 1}], got {branch}")
        self.unet, self.branch = unet, branch
        self.deep: torch.Tensor | None = None   # the up path's features before the branch's skip joins
        self.shape: tuple | None = None         # of the input they were computed for

    def full(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, concat: torch.Tensor | None = None,
             y: torch.Tensor | None = None) -> torch.Tensor:
        kept = {}
        feeder = self.unet.output_blocks[len(self.unet.output_blocks) - self.branch - 1]
        hook = feeder.register_forward_hook(lambda _m, _i, out: kept.update(deep=out))
        try:   # the network's own forward: bit-identical to a run without DeepCache
            out = self.unet(x, t, context, concat, y)
        finally:
            hook.remove()
        self.deep, self.shape = kept["deep"], tuple(x.shape)
        return out

    def fits(self, x: torch.Tensor) -> bool:
        return self.deep is not None and self.shape == tuple(x.shape)

    def shallow(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, concat: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        u, k = self.unet, self.branch
        h, emb, context = u.start(x, t, context, concat, y, None)
        skips = []
        for block in u.input_blocks[:k]:
            h = block(h, emb, context)
            skips.append(h)
        h = self.deep
        for block in u.output_blocks[len(u.output_blocks) - k:]:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return u.out(h)


def deepcache_denoiser(model, sigmas: torch.Tensor, interval: int, branch: int = 1) -> Denoiser:
    """model.denoiser with the deep features refreshed on steps 0, interval, 2·interval, ... of
    `sigmas` (one pass) and reused in between. A call's step comes from its sigma (step_index), so
    the closure holds no counter and each image of a request starts on a cache step; a call whose
    input shape differs from the cached one (a new batch layout) runs the full network."""
    if not isinstance(model.unet, UNet):
        raise ValueError("DeepCache needs a U-Net (this model's denoiser is a transformer)")
    if model.unet.config.pruned:   # its shallow pass pairs the first input blocks with the last output blocks
        raise ValueError("DeepCache needs the U-Net's whole decoder; this model's is pruned (fewer decoder blocks "
                         "or no middle block)")
    cache = DeepCache(model.unet, branch)
    full, shallow = model.denoiser_for(cache.full), model.denoiser_for(cache.shallow)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        if step_index(sigmas, sigma) % interval == 0 or not cache.fits(x):
            return full(x, sigma, **cond)
        return shallow(x, sigma, **cond)

    return denoise
