"""Several CLIP text towers read side by side: SDXL's text conditioning (Podell et al. 2023, §2.1).

Each tower tokenizes the prompt itself (its own pad token) and gives its context; the contexts are
joined along the width (SDXL base: CLIP ViT-L 768 + OpenCLIP ViT-bigG 1280 = 2048; the refiner:
bigG alone, 1280). The pooled embedding comes from the last tower, the one with a text projection.
Tower i is `encoders.i`, in the order of the original checkpoints' `conditioner.embedders.i`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from marble.models.clip import CLIP_PRESETS, CLIPTextConfig, CLIPTextEncoder


@dataclass(frozen=True)
class CLIPConcatConfig:
    encoders: tuple[CLIPTextConfig, ...]   # towers in checkpoint order; the last one pools

    kind = "clip-concat"                   # class attribute (not a field): the tag in config_to_dict

    def __post_init__(self):
        if not self.encoders:
            raise ValueError("clip-concat needs at least one text encoder")
        if len({c.max_tokens for c in self.encoders}) != 1:
            raise ValueError("the text encoders of clip-concat must read the same number of tokens")
        if not self.encoders[-1].projection_dim:
            raise ValueError("the last text encoder of clip-concat must have a text projection (it pools)")

    @property
    def width(self) -> int:
        return sum(c.width for c in self.encoders)

    @property
    def max_tokens(self) -> int:
        return self.encoders[0].max_tokens

    def replace(self, **changes) -> "CLIPConcatConfig":
        return replace(self, **changes)


_TINY_L = CLIPTextConfig(width=32, layers=5, heads=4, mlp_dim=37, clip_skip=2, final_norm=False)
_TINY_G = replace(_TINY_L, activation="gelu", pad_id=0, projection_dim=32)
CLIP_CONCAT_PRESETS: dict[str, CLIPConcatConfig] = {
    "sdxl-base-text": CLIPConcatConfig((CLIP_PRESETS["clip-vit-l-14-sdxl"], CLIP_PRESETS["openclip-vit-bigg-14"])),
    "sdxl-refiner-text": CLIPConcatConfig((CLIP_PRESETS["openclip-vit-bigg-14"],)),
    # diffusers' own SDXL tests' text towers (5 layers, width 32, projection 32), with CLIP's real
    # vocabulary and pad tokens (eos for the first, "!" for the second, as SDXL's tokenizers)
    "sdxl-tiny-text": CLIPConcatConfig((_TINY_L, _TINY_G)),
    "sdxl-tiny-refiner-text": CLIPConcatConfig((_TINY_G,)),
}


class CLIPConcatEncoder(nn.Module):
    """Prompts -> (B, T, sum of widths) context; `encode_pooled` adds the (B, projection) pooled
    embedding. The `TextEncoder` of marble.models.text."""

    def __init__(self, config: CLIPConcatConfig):
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleList(CLIPTextEncoder(c) for c in config.encoders)
        self.max_tokens = config.max_tokens
        self.dim = config.width
        self.pooled_dim = config.encoders[-1].projection_dim

    def count_tokens(self, prompt: str) -> int:
        return self.encoders[0].count_tokens(prompt)

    # rows of token ids, as the single-tower encoders take them: the first tower's rows (its pad
    # token) stand for all; each tower re-pads them with its own pad token
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.encoders[0].tokenize(prompts)

    def text_ids(self, text: str) -> list[int]:
        """The text's token ids without the start and end tokens, untruncated."""
        return self.encoders[0].tokenizer.encode(text)[1:-1]

    def chunk_row(self, ids: list[int]) -> list[int]:
        """One window of text ids as the first tower's full row (start, ids, end, pad)."""
        tok = self.encoders[0].tokenizer
        row = [tok.bos_id, *ids[:self.max_tokens - 2], tok.eos_id]
        return row + [self.encoders[0].pad_id] * (self.max_tokens - len(row))

    @property
    def comma_id(self) -> int | None:
        ids = self.text_ids(",")
        return ids[0] if len(ids) == 1 else None

    def _repad(self, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
        """`tokens` with every position after each row's first end token set to `pad_id`."""
        eos = self.encoders[0].tokenizer.eos_id
        first_end = (tokens == eos).int().argmax(dim=1, keepdim=True)
        after = torch.arange(tokens.shape[1], device=tokens.device)[None] > first_end
        return torch.where(after, torch.full_like(tokens, pad_id), tokens)

    def pooled_from_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, pooled_dim) float32 pooled embedding of the first tower's rows."""
        last = self.encoders[-1]
        return last.context_and_pooled(self._repad(tokens, last.pad_id))[1].float()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) rows of the first tower -> (B, T, dim) context, each tower reading its own padding."""
        return torch.cat([e(self._repad(tokens, e.pad_id)) for e in self.encoders], dim=-1)

    def encode_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (B, T, dim) context and (B, pooled_dim) pooled embedding."""
        device = next(self.parameters()).device
        contexts = [encoder(encoder.tokenize(prompts).to(device)) for encoder in self.encoders[:-1]]
        last = self.encoders[-1]
        context, pooled = last.context_and_pooled(last.tokenize(prompts).to(device))
        return torch.cat([*contexts, context], dim=-1).float(), pooled.float()

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_pooled(prompts)[0]
