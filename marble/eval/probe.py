"""Bias and homogeneity probe: what a model draws when the prompt leaves the choice to it.

For each under-specified prompt ("a shape", "some objects", "a colourful picture") and K seeds:
- the distributions of detected colours, shapes, object counts and positions (3x3 grid cell of
  each centre) beside the same distributions over training scenes that such a caption may
  describe, and their total-variation distance (0 = same distribution, 1 = disjoint) with its
  floor, the TV that K images drawn from the training distribution itself show;
- a diversity score: the mean pairwise distance between the seeds' layouts. A layout is the
  multisets of an image's colours, shapes and cells and its object count; the distance between
  two is 1 - |A & B| / |A | B| (multiset Jaccard; for counts 1 - min / max) per attribute, and
  "layout" is the mean of the four. A model that collapses to one answer scores 0; the training
  world's own score is given beside it.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from marble.data.shapes import sample_scene
from marble.eval.benchmark import Generate
from marble.eval.detector import detect
from marble.eval.prompts import Prompt, Requirement

PROBES = {"a shape": "one", "some objects": "many", "a colourful picture": "any"}
ATTRIBUTES = ("color", "shape", "count", "position")
REFERENCE_SCENES = 2000         # training samples the reference distribution is taken over
REFERENCE_LAYOUTS = 64          # of which this many give the reference diversity
CELLS = (("top", "middle", "bottom"), ("left", "center", "right"))


def probe_prompts() -> list[Prompt]:
    return [Prompt(text, Requirement("probe", (), family=family)) for text, family in PROBES.items()]


@dataclass(frozen=True)
class Item:
    """What the probe reads of one object: a detection or a true object."""
    color: str
    shape: str
    center: tuple[float, float]


def cell(center: tuple[float, float], size: int) -> str:
    row = CELLS[0][min(int(3 * center[1] / size), 2)]
    col = CELLS[1][min(int(3 * center[0] / size), 2)]
    return f"{row}-{col}"


def layout(items: Sequence[Item], size: int) -> dict[str, Counter]:
    """One image's layout: the multisets of its objects' colours, shapes and cells, and its count."""
    return {"color": Counter(o.color for o in items), "shape": Counter(o.shape for o in items),
            "position": Counter(cell(o.center, size) for o in items), "count": Counter({"n": len(items)})}


def _jaccard_distance(a: Counter, b: Counter) -> float:
    union = sum((a | b).values())
    return 0.0 if union == 0 else 1.0 - sum((a & b).values()) / union


def layout_distance(a: dict[str, Counter], b: dict[str, Counter]) -> dict[str, float]:
    """Per attribute, 1 - multiset Jaccard (for the count: 1 - min/max); 0 = the same.
    Two empty images are the same (0)."""
    return {k: _jaccard_distance(a[k], b[k]) for k in ATTRIBUTES}


def diversity(layouts: Sequence[dict[str, Counter]]) -> dict[str, float]:
    """Mean pairwise layout distance per attribute, and their mean ("layout")."""
    pairs = list(itertools.combinations(layouts, 2))
    out = {k: (sum(layout_distance(a, b)[k] for a, b in pairs) / len(pairs) if pairs else 0.0) for k in ATTRIBUTES}
    out["layout"] = sum(out[k] for k in ATTRIBUTES) / len(ATTRIBUTES)
    return out


def histograms(images: Sequence[Sequence[Item]], size: int) -> dict[str, dict[str, float]]:
    """Normalised distributions: colour, shape and position over objects, count over images."""
    counts = {a: Counter() for a in ATTRIBUTES}
    for items in images:
        counts["count"][str(len(items)) if len(items) < 5 else "5+"] += 1
        for o in items:
            counts["color"][o.color] += 1
            counts["shape"][o.shape] += 1
            counts["position"][cell(o.center, size)] += 1
    return {a: {k: v / sum(c.values()) for k, v in sorted(c.items())} for a, c in counts.items()}


def total_variation(p: dict[str, float], q: dict[str, float]) -> float | None:
    """0.5 * sum |p - q|; None when either distribution is empty (nothing detected)."""
    if not p or not q:
        return None
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


@lru_cache(maxsize=4)
def _training_items(size: int, n: int) -> tuple[tuple[Item, ...], ...]:
    return tuple(tuple(Item(o.color, o.shape, o.center) for o in sample_scene("train", 0, i, size)[0].objects)
                 for i in range(n))


def reference(family: str, size: int = 64, n: int = REFERENCE_SCENES) -> list[tuple[Item, ...]]:
    """True objects of the training scenes (samples 0..n-1, seed 0) a `family` caption can describe."""
    return [items for items in _training_items(size, n)
            if family == "any" or (family == "one") == (len(items) == 1)]


def tv_floor(ref: Sequence[Sequence[Item]], m: int, size: int, draws: int = 16) -> dict[str, float]:
    """The TV distance a perfect sampler of the training distribution shows with only `m` images:
    m training scenes drawn (with replacement, seeded) against all of them, averaged over draws.
    Below this a model's TV says nothing."""
    rng = np.random.Generator(np.random.PCG64(m))
    full = histograms(ref, size)
    totals = {a: 0.0 for a in ATTRIBUTES}
    for _ in range(draws):
        sub = histograms([ref[i] for i in rng.integers(len(ref), size=m)], size)
        for a in ATTRIBUTES:
            totals[a] += total_variation(sub[a], full[a]) or 0.0
    return {a: t / draws for a, t in totals.items()}


def run_probe(generate: Generate, seeds: Sequence[int], size: int = 64) -> dict:
    """The probe's report as a dict (JSON-ready): per prompt, generated and training histograms,
    their TV distances, diversity of the generated layouts and of the training world."""
    report = {}
    for prompt in probe_prompts():
        family = prompt.requirement.family
        images = []
        for seed in seeds:
            image = generate(prompt.text, seed)
            images.append([Item(d.color, d.shape, d.center) for d in detect(image)])
            size = image.width
        ref = reference(family, size)
        gen_h, ref_h = histograms(images, size), histograms(ref, size)
        report[prompt.text] = {
            "family": family, "images": len(images),
            "objects_per_image": sum(map(len, images)) / max(len(images), 1),
            "diversity": diversity([layout(x, size) for x in images]),
            "training_diversity": diversity([layout(x, size) for x in ref[:REFERENCE_LAYOUTS]]),
            "tv": {a: total_variation(gen_h[a], ref_h[a]) for a in ATTRIBUTES},
            "tv_floor": tv_floor(ref, len(images), size),
            "generated": gen_h, "training": ref_h,
        }
    return report


def probe_table(report: dict) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    def top(h):
        return max(h, key=h.get) if h else "-"
    lines = ["| probe prompt | images | objects / image | diversity (model / training) | TV colour (floor) "
             "| TV shape (floor) | TV count (floor) | TV position (floor) | commonest colour, shape (model / training) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for text, r in report.items():
        g, t = r["generated"], r["training"]
        lines.append(f"| {text} | {r['images']} | {r['objects_per_image']:.2f} | "
                     f"{r['diversity']['layout']:.2f} / {r['training_diversity']['layout']:.2f} | " +
                     " | ".join(f"{fmt(r['tv'][a])} ({fmt(r['tv_floor'][a])})" for a in ATTRIBUTES) +
                     f" | {top(g['color'])} {top(g['shape'])} / {top(t['color'])} {top(t['shape'])} |")
    return "\n".join(lines)
