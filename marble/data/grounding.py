"""What each caption word refers to: per-group masks and token indices for grounding losses.

A shapes-world caption names its scene's groups (`scene.groups`, the caption's noun phrases) with a
shape noun (a synonym, a plural; "plus sign" is two words) and, most of the time, a colour word
right before it ("two small violet stars": size, colour, noun, marble.data.captions.words). Each
group's noun occurs exactly once in a caption that names it: the groups of one scene have
different shapes (`two` and `relation` scenes draw two different shapes), so matching whole words
finds the group's words without the caption's random choices. A colour word counts only in front
of its noun, so "on a pale blue background" never grounds a blue shape.

A group's mask is its silhouettes (as marble.data.sketch draws them: a pixel is inside when its
centre is), pooled to a grid by "any pixel of the cell": every object keeps at least one cell at
every grid the image side divides by, as TokenCompose's masks do (resized, then > 0).
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np

from marble.data.captions import COLOR_SYNONYMS, SHAPE_SYNONYMS, plural
from marble.data.scene import Scene
from marble.data.shapes import coverage

MAX_GROUPS = 2          # the shapes world's captions name at most two groups
MAX_GROUP_TOKENS = 6    # word pieces of a colour + noun: "violet plus signs" is 4 (tested on many scenes)

Span = tuple[int, int]  # characters [start, end) of the caption


def _words(text: str) -> list[tuple[str, Span]]:
    return [(m.group(), m.span()) for m in re.finditer(r"\S+", text)]


def noun_forms(shape: str, count: int) -> tuple[tuple[str, ...], ...]:
    """The word sequences a caption may name `count` objects of `shape` with."""
    names = SHAPE_SYNONYMS.get(shape, (shape,))
    return tuple(tuple((name if count == 1 else plural(name)).split()) for name in names)


def group_spans(scene: Scene, text: str) -> list[list[Span]]:
    """For each of the scene's groups, the character spans of its words in `text`: its noun's
    words, then its colour word when the caption states one; [] for a group the caption does not
    name (generic captions, "" for caption dropout). ValueError if a noun occurs more than once."""
    words = _words(text.lower())
    out = []
    for group in scene.groups:
        obj = scene.objects[group[0]]
        hits = [(i, form) for form in noun_forms(obj.shape, len(group)) for i in range(len(words) - len(form) + 1)
                if tuple(w for w, _ in words[i:i + len(form)]) == form]
        if not hits:
            out.append([])
            continue
        if len(hits) > 1:
            raise ValueError(f"the noun of {obj.shape!r} occurs {len(hits)} times in {text!r}")
        start, form = hits[0]
        spans = [span for _, span in words[start:start + len(form)]]
        if start > 0 and words[start - 1][0] in COLOR_SYNONYMS.get(obj.color, (obj.color,)):
            spans.append(words[start - 1][1])
        out.append(spans)
    return out


def token_indices(spans: list[Span], offsets: list[Span], max_tokens: int) -> list[int]:
    """Positions of the tokens that lie inside `spans`, from the tokenizer's character `offsets` of
    every token (special tokens have empty spans); positions the context's truncation to
    `max_tokens` drops (the last one keeps the closing special token) are left out."""
    return [i for i, (a, b) in enumerate(offsets)
            if b > a and i < max_tokens - 1 and any(s <= a and b <= e for s, e in spans)]


def group_masks(scene: Scene, side: int) -> np.ndarray:
    """(groups, side, side) bool: the cells of a side × side grid that any pixel of the group's
    silhouettes falls in; side must divide the image side."""
    n = scene.size
    if n % side:
        raise ValueError(f"a {side}×{side} grid does not divide a {n}-pixel image")
    f = n // side
    out = np.zeros((len(scene.groups), side, side), bool)
    for g, group in enumerate(scene.groups):
        pixels = np.zeros((n, n), bool)
        for i in group:
            obj = scene.objects[i]
            extent = max(obj.bbox[2] - obj.bbox[0], obj.bbox[3] - obj.bbox[1])
            pixels |= coverage(obj.shape, obj.center, extent, (n, n), supersample=1) > 0.5
        out[g] = pixels.reshape(side, f, side, f).any(axis=(1, 3))
    return out


def grounding_targets(scene: Scene, text: str, offsets: Callable[[str], list[Span]], side: int,
                      max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(masks (MAX_GROUPS, side, side) bool, tokens (MAX_GROUPS, MAX_GROUP_TOKENS) int16): each
    group's mask and the context positions of its words, -1 where there are none (a group the
    caption does not name, or the second group of a one-group scene)."""
    masks = np.zeros((MAX_GROUPS, side, side), bool)
    tokens = np.full((MAX_GROUPS, MAX_GROUP_TOKENS), -1, np.int16)
    masks[:len(scene.groups)] = group_masks(scene, side)[:MAX_GROUPS]
    token_offsets = offsets(text)
    for g, spans in enumerate(group_spans(scene, text)[:MAX_GROUPS]):
        found = token_indices(spans, token_offsets, max_tokens)
        if len(found) > MAX_GROUP_TOKENS:
            raise ValueError(f"group {g} of {text!r} has {len(found)} tokens, more than {MAX_GROUP_TOKENS}")
        tokens[g, :len(found)] = found
    return masks, tokens
