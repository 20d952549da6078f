"""The concept splits: a shape the base world never draws (the heart), to teach a trained model.

The built-in model is trained on the base splits, which never contain a heart (it is not in
SHAPES, so no base draw can pick it). A LoRA is trained on a small folder exported from the
"concept" split and judged on "concept-new", which shows the heart only in combinations the
"concept" split holds back (docs/eval.md):

- colours: in "concept" a heart is red, pink, purple, orange or blue (CONCEPT_COLORS); green,
  yellow and black hearts (CONCEPT_NEW_COLORS) are new;
- counts: "concept" shows one or two hearts; three and four hearts are new;
- partners: in "concept" the heart appears with circles, squares, triangles and diamonds
  (CONCEPT_PARTNERS), never with a star or a cross (CONCEPT_NEW_PARTNERS), in a two-object or a
  relation scene.
Every "concept" image contains a heart and no held-back combination; every "concept-new" image
contains a heart and at least one held-back combination. The other shapes keep to the base
world's seen (colour, shape) pairs, so the base held-out pairs stay unseen.
"""
from __future__ import annotations

import numpy as np

from marble.data.scene import GroupSpec

CONCEPT_SHAPE = "heart"
CONCEPT_COLORS: tuple[str, ...] = ("red", "pink", "purple", "orange", "blue")
CONCEPT_NEW_COLORS: tuple[str, ...] = ("green", "yellow", "black")
CONCEPT_COUNTS: tuple[int, ...] = (1, 2)
CONCEPT_NEW_COUNTS: tuple[int, ...] = (3, 4)
CONCEPT_PARTNERS: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
CONCEPT_NEW_PARTNERS: tuple[str, ...] = ("star", "cross")


def partner_pairs(partners, seen_pairs) -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs the heart's partners are drawn in: the base world's seen pairs
    (shapes.SEEN_PAIRS; passed in, as the base world imports this module)."""
    return tuple(p for p in seen_pairs if p[1] in partners)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def concept_content(rng: np.random.Generator, kind: str, split: str,
                    seen_pairs) -> tuple[list[GroupSpec], str | None]:
    """Which groups (and relation) a concept scene of `kind` shows. "concept": a heart in a
    training colour, one or two of them, partners from CONCEPT_PARTNERS. "concept-new": single
    scenes a new colour, count scenes three or four hearts, two-object and relation scenes a
    partner from CONCEPT_NEW_PARTNERS (the heart's colour from either list)."""
    new = split == "concept-new"
    size = lambda: _pick(rng, ("small", "large"))  # noqa: E731
    heart = CONCEPT_SHAPE
    if kind == "single":
        return [GroupSpec(_pick(rng, CONCEPT_NEW_COLORS if new else CONCEPT_COLORS), heart, size(), 1)], None
    if kind == "count":
        n = _pick(rng, CONCEPT_NEW_COUNTS if new else CONCEPT_COUNTS[1:])
        return [GroupSpec(_pick(rng, CONCEPT_COLORS), heart, size() if n == 2 else "small", n)], None
    colors = CONCEPT_COLORS + CONCEPT_NEW_COLORS if new else CONCEPT_COLORS
    partner = _pick(rng, partner_pairs(CONCEPT_NEW_PARTNERS if new else CONCEPT_PARTNERS, seen_pairs))
    if kind == "two":
        groups = [GroupSpec(_pick(rng, colors), heart, size()), GroupSpec(*partner, size())]
        return (groups[::-1] if rng.random() < 0.5 else groups), None
    # relation: the heart first or second, either axis, one or two objects per group
    relation = _pick(rng, ("left of", "right of", "above", "below"))
    counts = [2 if rng.random() < 0.2 else 1, 2 if rng.random() < 0.2 else 1]
    sizes = ["small" if n == 2 else size() for n in counts]
    groups = [GroupSpec(_pick(rng, colors), heart, sizes[0], counts[0]),
              GroupSpec(partner[0], partner[1], sizes[1], counts[1])]
    return (groups[::-1] if rng.random() < 0.5 else groups), relation


def is_new(objects) -> bool:
    """Whether a picture of `objects` ((colour, shape) per object; colour may be None) shows a
    combination the "concept" split holds back: a heart of a new colour, three or more hearts, or
    a heart with a star or a cross."""
    objects = list(objects)
    hearts = [c for c, s in objects if s == CONCEPT_SHAPE]
    if not hearts:
        return False
    return (any(c in CONCEPT_NEW_COLORS for c in hearts) or len(hearts) >= min(CONCEPT_NEW_COUNTS)
            or any(s in CONCEPT_NEW_PARTNERS for _, s in objects))
