"""The benchmark's prompts: GenEval's six categories, drawn deterministically from a split.

Each prompt carries its category and the structured requirement its verdict checks, e.g.
"three green triangles" -> Requirement(objects=(Need("triangle", "green", 3),)).

Splits (docs/eval.md):
- seen: every (colour, shape) pair and relation picture occurs in the training split;
- heldout: every prompt names a held-out composition: single object, colors and counting use a
  held-out (colour, shape) pair, two objects and color attribution two of them, position a
  held-out relation picture (with seen colours, so only the arrangement is new);
- concept: the heart (marble/data/concept.py) in the combinations the "concept" training split
  shows: training colours, one or two hearts, circle/square/triangle/diamond partners;
- concept-new: the heart only in combinations "concept" holds back: single object and colors a
  new colour (green, yellow, black), counting three or four hearts, two objects, color
  attribution and position a star or cross partner.

`render_truth(requirement, seed)` draws the requirement with the world itself: the groundtruth
baseline, which must score ~1.
"""
from __future__ import annotations

import itertools
import json
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from marble.data import concept
from marble.data.captions import canonical_relation, phrase
from marble.data.scene import RELATIONS, canonical
from marble.data.shapes import (BACKGROUNDS, HELDOUT_PAIRS, HELDOUT_RELATIONS, SEEN_PAIRS,
                                SEEN_RELATIONS, GroupSpec, compose, render, sample_scene)

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
# 200 prompts by default, split about evenly (GenEval: 553 over the same six)
DEFAULT_COUNTS = {"single_object": 32, "two_objects": 34, "counting": 34, "colors": 32, "position": 34,
                  "color_attr": 34}
BASE_SPLITS = ("seen", "heldout")
CONCEPT_SPLITS = ("concept", "concept-new")
SPLITS = BASE_SPLITS + CONCEPT_SPLITS
TEMPLATES = ("{}", "a picture of {}")   # single-object phrasings (both are training templates)
_SPLIT_CODE = {"seen": 0, "heldout": 1, "concept": 2, "concept-new": 3}


@dataclass(frozen=True)
class Need:
    """`count` objects of `shape` and `color` (size as the prompt states it, else free)."""
    shape: str
    color: str | None = None
    count: int = 1
    size: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class Requirement:
    category: str
    objects: tuple[Need, ...]
    relation: str | None = None       # position: objects[0] is `relation` of objects[1]
    family: str | None = None         # probe prompts: "one", "many" or "any" object(s)

    def to_dict(self) -> dict:
        d = {"category": self.category, "objects": [o.to_dict() for o in self.objects]}
        if self.relation:
            d["relation"] = self.relation
        if self.family:
            d["family"] = self.family
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Requirement":
        return cls(d["category"], tuple(Need(**o) for o in d["objects"]), d.get("relation"), d.get("family"))


@dataclass(frozen=True)
class Prompt:
    text: str
    requirement: Requirement

    @property
    def category(self) -> str:
        return self.requirement.category


def _pairs(split: str) -> list[tuple[str, str]]:
    return sorted(HELDOUT_PAIRS) if split == "heldout" else list(SEEN_PAIRS)


def _candidates(category: str, split: str, rng: np.random.Generator) -> list[Prompt]:
    """Every distinct prompt of a category in a split, in a seeded order."""
    if split in CONCEPT_SPLITS:
        out = _concept_candidates(category, split == "concept-new", rng)
    else:
        out = _base_candidates(category, split, rng)
    unique = list({p.text + "|" + category: p for p in out}.values())
    order = rng.permutation(len(unique))
    return [unique[i] for i in order]


def _base_candidates(category: str, split: str, rng: np.random.Generator) -> list[Prompt]:
    pairs = _pairs(split)
    out = []
    if category in ("single_object", "colors"):
        for (c, s), size, template in itertools.product(pairs, (None, "small", "large"), TEMPLATES):
            out.append(Prompt(template.format(phrase(c, s, 1, size)), Requirement(category, (Need(s, c, 1, size),))))
    elif category == "counting":
        for (c, s), n, digits in itertools.product(pairs, (2, 3, 4), (False, True)):
            out.append(Prompt(phrase(c, s, n, digits=digits), Requirement(category, (Need(s, c, n),))))
    elif category in ("two_objects", "color_attr"):
        for a, b in itertools.permutations(pairs, 2):
            if a[1] != b[1]:
                out.append(Prompt(f"{phrase(*a)} and {phrase(*b)}",
                                  Requirement(category, (Need(a[1], a[0]), Need(b[1], b[0])))))
    elif category == "position":
        configs = sorted(HELDOUT_RELATIONS) if split == "heldout" else list(SEEN_RELATIONS)
        colors = {s: [c for c, s2 in SEEN_PAIRS if s2 == s] for _, s in SEEN_PAIRS}
        for (axis, first, second), _ in itertools.product(configs, range(4)):     # 4 colourings each
            for relation, a, b in ((("left of", first, second), ("right of", second, first)) if axis == "horizontal"
                                   else (("above", first, second), ("below", second, first))):
                ca = colors[a][int(rng.integers(len(colors[a])))]
                cb = colors[b][int(rng.integers(len(colors[b])))]
                out.append(Prompt(f"{phrase(ca, a)} {canonical_relation(relation)} {phrase(cb, b)}",
                                  Requirement(category, (Need(a, ca), Need(b, cb)), relation)))
    else:
        raise ValueError(f"unknown category {category!r}")
    return out


def _concept_candidates(category: str, new: bool, rng: np.random.Generator) -> list[Prompt]:
    """The concept splits' prompts: the heart in the combinations of "concept" (new=False) or only
    in those it holds back (new=True), under the six categories' rules."""
    heart = concept.CONCEPT_SHAPE
    colors = concept.CONCEPT_NEW_COLORS if new else concept.CONCEPT_COLORS
    partners = concept.partner_pairs(concept.CONCEPT_NEW_PARTNERS if new else concept.CONCEPT_PARTNERS, SEEN_PAIRS)
    any_color = concept.CONCEPT_COLORS + concept.CONCEPT_NEW_COLORS if new else concept.CONCEPT_COLORS
    out = []
    if category in ("single_object", "colors"):
        for c, size, template in itertools.product(colors, (None, "small", "large"), TEMPLATES):
            out.append(Prompt(template.format(phrase(c, heart, 1, size)),
                              Requirement(category, (Need(heart, c, 1, size),))))
    elif category == "counting":
        counts = concept.CONCEPT_NEW_COUNTS if new else concept.CONCEPT_COUNTS[1:]
        for c, n, digits in itertools.product(concept.CONCEPT_COLORS, counts, (False, True)):
            out.append(Prompt(phrase(c, heart, n, digits=digits), Requirement(category, (Need(heart, c, n),))))
    elif category in ("two_objects", "color_attr"):
        for c, (pc, ps), heart_first in itertools.product(any_color, partners, (True, False)):
            a, b = ((c, heart), (pc, ps)) if heart_first else ((pc, ps), (c, heart))
            out.append(Prompt(f"{phrase(*a)} and {phrase(*b)}",
                              Requirement(category, (Need(a[1], a[0]), Need(b[1], b[0])))))
    elif category == "position":
        shapes = sorted({s for _, s in partners})
        for relation, partner, heart_first, _ in itertools.product(RELATIONS, shapes, (True, False), range(2)):
            c = any_color[int(rng.integers(len(any_color)))]
            pcs = [pc for pc, ps in partners if ps == partner]
            pc = pcs[int(rng.integers(len(pcs)))]
            a, b = ((c, heart), (pc, partner)) if heart_first else ((pc, partner), (c, heart))
            out.append(Prompt(f"{phrase(*a)} {canonical_relation(relation)} {phrase(*b)}",
                              Requirement(category, (Need(a[1], a[0]), Need(b[1], b[0])), relation)))
    else:
        raise ValueError(f"unknown category {category!r}")
    return out


def _pool(category: str, split: str) -> list[Prompt]:
    """A category's distinct prompts in the split, in their fixed seeded order."""
    rng = np.random.Generator(np.random.PCG64([_SPLIT_CODE[split], CATEGORIES.index(category)]))
    return _candidates(category, split, rng)


def build_prompts(split: str, counts: dict[str, int] | None = None) -> list[Prompt]:
    """The benchmark's prompt list for a split: `counts[category]` prompts per category (default
    DEFAULT_COUNTS, 200 in all), the same list every time. A category with fewer distinct prompts
    than asked repeats its list."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    counts = DEFAULT_COUNTS if counts is None else counts
    prompts = []
    for category in CATEGORIES:
        n = counts.get(category, 0)
        if n <= 0:
            continue
        pool = _pool(category, split)
        prompts.extend(pool[i % len(pool)] for i in range(n))
    return prompts


def repeated(split: str, counts: dict[str, int]) -> dict[str, tuple[int, int]]:
    """The categories asked for more prompts than they have distinct texts: {category: (asked,
    distinct)}. build_prompts repeats their lists, and a repeated text at one seed is the same image."""
    asked = {c: counts[c] for c in CATEGORIES if counts.get(c, 0) > 0}
    distinct = {c: len(_pool(c, split)) for c in asked}
    return {c: (n, distinct[c]) for c, n in asked.items() if n > distinct[c]}


def scale_counts(total: int) -> dict[str, int]:
    """DEFAULT_COUNTS scaled to about `total` prompts (at least one per category)."""
    base = sum(DEFAULT_COUNTS.values())
    return {c: max(1, round(n * total / base)) for c, n in DEFAULT_COUNTS.items()}


def pick_categories(text: str) -> tuple[str, ...]:
    """`a,b` -> those categories in CATEGORIES order; ValueError naming the valid ones. A category's
    prompts depend only on the split and the category (build_prompts), so a subset keeps the
    prompts each category has in the full run."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CATEGORIES]
    if unknown or not names:
        what = f"unknown category {unknown[0]!r}" if unknown else "no category given"
        raise ValueError(f"{what}; choose from {', '.join(CATEGORIES)}")
    return tuple(c for c in CATEGORIES if c in names)


def is_heldout(requirement: Requirement) -> bool:
    """Whether the requirement names a composition the training split never shows."""
    if any((o.color, o.shape) in HELDOUT_PAIRS for o in requirement.objects):
        return True
    if requirement.relation:
        a, b = requirement.objects[:2]
        return canonical(requirement.relation, a.shape, b.shape) in HELDOUT_RELATIONS
    return False


def is_concept_new(requirement: Requirement) -> bool:
    """Whether the requirement names a heart combination the "concept" split holds back."""
    return concept.is_new((o.color, o.shape) for o in requirement.objects for _ in range(o.count))


def _rng(requirement: Requirement, seed: int) -> np.random.Generator:
    key = zlib.crc32(json.dumps(requirement.to_dict(), sort_keys=True).encode())
    return np.random.Generator(np.random.PCG64([int(seed), key]))


def truth_scene(requirement: Requirement, seed: int, size: int = 64):
    """A world scene that satisfies `requirement` (probe families: a training scene of that family)."""
    rng = _rng(requirement, seed)
    if requirement.family:
        for index in itertools.count(int(rng.integers(2**31))):
            scene, _ = sample_scene("train", 0, index, size)
            n = len(scene.objects)
            if requirement.family == "any" or (requirement.family == "one") == (n == 1):
                return scene
    while True:
        groups = []
        for need in requirement.objects:
            size_name = need.size or ("small" if need.count > 2 else ("small", "large")[int(rng.integers(2))])
            groups.append(GroupSpec(need.color or "black", need.shape, size_name, need.count))
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        scene = compose(rng, groups, size, background, relation=requirement.relation)
        if scene is not None:
            return scene


def render_truth(requirement: Requirement, seed: int, size: int = 64) -> Image.Image:
    """The requirement drawn by the world itself, deterministic in (requirement, seed)."""
    return render(truth_scene(requirement, seed, size))
