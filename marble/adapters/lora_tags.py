"""A1111's LoRA prompt tags: `<lora:NAME:WEIGHT>` and `<lora:NAME:TE:UNET>`, taken out of the prompt.

As in A1111 (extra networks): the weight defaults to 1; one number sets both multipliers; a second
sets the U-Net's apart from the text encoder's; `te=` / `unet=` name them. The tag is removed from
the prompt text before encoding, so it never reaches the tokenizer. The same NAME twice adds up,
as two tags do in A1111.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

_TAG = re.compile(r"<lora:([^>]*)>", re.IGNORECASE)


class LoraTagError(ValueError):
    """A malformed tag; the message is one line for the user."""


@dataclass(frozen=True)
class LoraTag:
    name: str           # looked up in the LoRA folder (lora_folder.resolve_lora)
    te: float = 1.0     # text-encoder multiplier
    unet: float = 1.0   # U-Net multiplier


def _number(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LoraTagError(f"LoRA tag <lora:{tag}>: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise LoraTagError(f"LoRA tag <lora:{tag}>: {text.strip()!r} is not a finite number")
    return value


def _parse(body: str) -> LoraTag:
    name, *args = body.split(":")
    name = name.strip()
    if not name:
        raise LoraTagError(f"LoRA tag <lora:{body}> has no name")
    positional, named = [], {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq:
            if key.strip() not in ("te", "unet"):
                raise LoraTagError(f"LoRA tag <lora:{body}>: unknown argument {key.strip()!r} (te= or unet=)")
            named[key.strip()] = _number(value, body)
        else:
            positional.append(_number(arg, body))
    if len(positional) > 2:
        raise LoraTagError(f"LoRA tag <lora:{body}> has more than two weights (te and unet)")
    te = positional[0] if positional else 1.0
    unet = positional[1] if len(positional) > 1 else te
    return LoraTag(name, named.get("te", te), named.get("unet", unet))


def split_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(prompt without its tags, the tags in order). The tags are cut out as A1111 does, leaving the
    spaces around them: both tokenizers split on whitespace, so the tokens are the same."""
    tags = [_parse(m.group(1)) for m in _TAG.finditer(prompt)]
    return (_TAG.sub("", prompt), tags) if tags else (prompt, [])
