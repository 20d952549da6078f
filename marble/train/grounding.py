"""Token grounding for `marble train diffusion` (TokenCompose, Wang et al. CVPR 2024): the model
table's `grounding = {token_weight, pixel_weight, levels}` adds its two losses on the U-Net's
cross-attention maps, from the shapes world's object masks.

  token_weight   weight of the token loss (TokenCompose: 1e-3); 0 = off
  pixel_weight   weight of the pixel loss (TokenCompose: 5e-5); 0 = off
  levels         U-Net levels whose cross-attention is supervised (0 = the latent's own grid, each
                 next level half its side; the last level includes the middle block); default [0, 1]

With both weights 0, or no table, nothing is hooked, cached or drawn: the run is the plain recipe
bit for bit. The targets (marble/data/grounding.py) are cached beside the latents as
run_dir/cache/grounding.safetensors, keyed by the data table, the text encoder config and the grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from marble.config import config_from_dict
from marble.models.layers import SpatialTransformer
from marble.models.tokenizer import WordPieceTokenizer
from marble.train.attention_maps import cross_attention_maps
from marble.train.config import ConfigError, DataConfig, TrainConfig
from marble.train.data import _cached, digest
from marble.train.distributed import World, barrier
from marble.train.grounding_loss import grounding_loss, pool_masks

FORMAT = ("grounding targets v1: masks (N, G, s, s) uint8, 1 where group g's silhouettes touch the cell "
          "of an s x s grid over image n; tokens (N, G, K) int16, the text context positions of group g's "
          "noun and colour word pieces in image n's caption, -1 = none (marble/data/grounding.py)")


@dataclass
class GroundingConfig:
    token_weight: float = 0.0
    pixel_weight: float = 0.0
    levels: list[int] = field(default_factory=lambda: [0, 1])

    @property
    def on(self) -> bool:
        return self.token_weight > 0 or self.pixel_weight > 0


def grounding_config(spec) -> GroundingConfig:
    if not isinstance(spec, dict):
        raise ConfigError(f"model.grounding must be a table {{token_weight, pixel_weight, levels}}, got {spec!r}")
    cfg = config_from_dict(GroundingConfig, spec, "model.grounding")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not (number(cfg.token_weight) and number(cfg.pixel_weight)):
        raise ConfigError("model.grounding's token_weight and pixel_weight must be numbers >= 0")
    if not (isinstance(cfg.levels, list) and cfg.levels and
            all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in cfg.levels)):
        raise ConfigError(f"model.grounding.levels must be a list of U-Net levels >= 0, got {cfg.levels!r}")
    return cfg


def token_offsets(text_encoder) -> Callable[[str], list[tuple[int, int]]]:
    """The character span of every context token of a caption, in the encoder's tokenization."""
    tokenizer = getattr(text_encoder, "tokenizer", None)
    if not isinstance(tokenizer, WordPieceTokenizer):
        raise ConfigError("model.grounding needs a WordPiece text encoder (MiniLM, {preset = \"minilm-l6\"})")
    return lambda text: tokenizer.tokenizer.encode(text).offsets


def grounding_cache(path: Path, key: str, data: DataConfig, offsets, side: int, max_tokens: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks (N, G, side, side) bool, tokens (N, G, K) long) of the shapes world's images 0..n-1,
    computed once: the scenes and captions are re-drawn (a pure function of the data table), so
    row i belongs to the data set's image i."""
    from marble.data.grounding import grounding_targets
    from marble.data.shapes import kind_probabilities, sample_scene

    def compute():
        kinds = kind_probabilities(data.kinds)
        masks, tokens = [], []
        for i in range(data.n):
            scene, caption = sample_scene(data.split, data.seed, i, data.size, kinds)
            m, t = grounding_targets(scene, caption, offsets, side, max_tokens)
            masks.append(m)
            tokens.append(t)
        return {"masks": torch.from_numpy(np.stack(masks).astype(np.uint8)),
                "tokens": torch.from_numpy(np.stack(tokens))}

    cached = _cached(path, key, compute, {"format": FORMAT})
    return cached["masks"].bool(), cached["tokens"].long()


def cached_grounding(cfg: TrainConfig, world: World, text, text_config: dict, side: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The grounding targets of the run's data at a side x side latent, in run_dir/cache under a
    key of the data table, the text encoder config (its tokenizer) and the grid. Rank 0 computes
    and writes, the others read after the barrier."""
    if cfg.data.folder or cfg.data.world != "shapes":
        raise ConfigError("model.grounding needs the shapes world's object masks (data.world = \"shapes\")")
    path = Path(cfg.run_dir) / "cache" / "grounding.safetensors"
    key = digest(cfg.data.__dict__, text_config, side, FORMAT)
    offsets = token_offsets(text)
    if world.is_main:
        grounding_cache(path, key, cfg.data, offsets, side, text.max_tokens)
    barrier(world)
    return grounding_cache(path, key, cfg.data, offsets, side, text.max_tokens)


def grounding_term(cfg: GroundingConfig, unet: nn.Module, masks: torch.Tensor, tokens: torch.Tensor):
    """A closure (denoising loss thunk, image rows, dropped captions) -> (loss, log metrics): it
    runs the denoising loss with the cross-attention maps recorded and adds the weighted grounding
    terms summed over `cfg.levels` (TokenCompose adds its resolutions' terms)."""
    if not any(isinstance(m, SpatialTransformer) for m in unet.modules()):
        raise ConfigError("model.grounding supervises a U-Net's cross-attention; this network has none")
    side = masks.shape[-1]
    grids = {level: (side >> level, side >> level) for level in cfg.levels}
    if any(h < 1 or side % h for h, _ in grids.values()):
        raise ConfigError(f"model.grounding.levels {cfg.levels} do not fit a {side}x{side} latent")
    c = unet.config
    middle = {len(c.channel_mult) - 1} if c.middle_block else set()     # the middle block sits at the last level
    attended = set(c.attention_levels) | middle
    if not set(cfg.levels) <= attended:
        raise ConfigError(f"model.grounding.levels {cfg.levels}: this U-Net has cross-attention only at levels "
                          f"{sorted(attended)}")

    def term(denoising: Callable[[], torch.Tensor], rows: torch.Tensor, dropped: torch.Tensor):
        with cross_attention_maps(unet, set(grids.values())) as maps:
            loss = denoising()
        words = torch.where(dropped[:, None, None], torch.full_like(tokens[rows], -1), tokens[rows])
        token = pixel = loss.new_zeros(())
        for level, grid in grids.items():
            if not maps[grid]:
                raise ConfigError(f"model.grounding.levels: level {level} ({grid[0]}x{grid[1]}) has no cross-attention")
            dev = maps[grid][0].device
            t, p = grounding_loss(maps[grid], pool_masks(masks[rows], grid[0]).to(dev), words.to(dev))
            token, pixel = token + t, pixel + p
        total = loss + cfg.token_weight * token + cfg.pixel_weight * pixel
        return total, {"denoise": loss.item(), "token": token.item(), "pixel": pixel.item()}
    return term


def grounding_closure(cfg: GroundingConfig, run: TrainConfig, world: World, unet: nn.Module, text,
                      text_config: dict, side: int):
    """grounding_term over the run's cached targets, or None when the table is off: then nothing is
    hooked, cached or drawn, and the run is its plain recipe bit for bit."""
    if not cfg.on:
        return None
    return grounding_term(cfg, unet, *cached_grounding(run, world, text, text_config, side))
