"""Markdown tables from `marble eval` JSON files: GenEval / strict per category, side by side, or
(`--position`) the position verdict split into axis and direction.

Each row is a (label, JSON) pair. Files written before the strict verdict existed (the shipped
model's eval-heldout.json and eval-seen.json) are judged again from their stored detections: the
strict verdict is a function of the detections and the prompt's requirement, so no image is redrawn.

    python benchmarks/eval_table.py shipped=docs/results/builtin-v1/eval-heldout.json \
        mmdit=docs/results/builtin-v2-mmdit/eval-heldout.json
    python benchmarks/eval_table.py --position shipped=docs/results/builtin-v1/eval-heldout.json \
        coords=docs/results/builtin-v2-coords/eval-heldout.json

GenEval's position verdict mixes two things a model can learn apart: the *axis* a relation word
names ("above"/"below" are vertical, "left of"/"right of" horizontal) and the *direction*, which of
the two named objects comes first. This splits them, from the detections stored in `marble eval`
JSON files (no image is redrawn). For each position image in which both named shapes were found
(the prompt's colour preferred, as marble.eval.verdict picks them), it takes the first detection of
each, and asks whether the centre offset's larger component lies on the relation's axis, and
if so whether its sign is the relation's. Chance is 0.5 for either question.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from marble.eval.detector import Detection
from marble.eval.prompts import Requirement
from marble.eval.strict import judge_strict

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")


def _detection(d: dict) -> Detection:
    return Detection(d["color"], d["shape"], d["size"], tuple(d["center"]), tuple(d["bbox"]), d["score"])


def strict_accuracies(result: dict) -> dict[str, float]:
    """Category -> strict accuracy, from the stored detections."""
    passed: dict[str, list[bool]] = {}
    for p in result["prompts"]:
        requirement = Requirement.from_dict(p["requirement"])
        for image in p["images"]:
            ok, _ = judge_strict(requirement, [_detection(d) for d in image["detected"]])
            passed.setdefault(p["category"], []).append(ok)
    return {c: sum(v) / len(v) for c, v in passed.items()}


def scores(result: dict) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    """Category -> (GenEval, strict), and the overall pair (the mean over categories)."""
    cats = result["categories"]
    strict = ({c: v["strict_accuracy"] for c, v in cats.items()} if all("strict_accuracy" in v for v in cats.values())
              else strict_accuracies(result))
    pairs = {c: (cats[c]["accuracy"], strict[c]) for c in CATEGORIES if c in cats}
    n = len(pairs)
    return pairs, (sum(a for a, _ in pairs.values()) / n, sum(s for _, s in pairs.values()) / n)


def table(rows: list[tuple[str, dict]]) -> str:
    head = "| model | split | " + " | ".join(CATEGORIES) + " | overall | images |"
    lines = [head, "|" + "---|" * (len(CATEGORIES) + 4)]
    for label, result in rows:
        pairs, (overall, overall_strict) = scores(result)
        cells = [f"{pairs[c][0]:.3f} / {pairs[c][1]:.3f}" if c in pairs else "" for c in CATEGORIES]
        lines.append(f"| {label} | {result['split']} | " + " | ".join(cells)
                     + f" | **{overall:.3f} / {overall_strict:.3f}** | {result['images']} |")
    return "\n".join(lines)


# --- --position: axis and direction -----------------------------------------------------------

AXIS = {"left of": 0, "right of": 0, "above": 1, "below": 1}
# image coordinates: x grows to the right, y downwards
SIGN = {"left of": -1, "right of": 1, "above": -1, "below": 1}


@dataclass(frozen=True)
class Counts:
    images: int = 0
    both: int = 0           # both named shapes detected
    on_axis: int = 0        # ... and offset mostly along the relation's axis
    right_way: int = 0      # ... and in the relation's direction

    def __add__(self, o: "Counts") -> "Counts":
        return Counts(self.images + o.images, self.both + o.both, self.on_axis + o.on_axis,
                      self.right_way + o.right_way)


def _pick(detected: list[dict], need: dict) -> dict | None:
    mine = [d for d in detected if d["shape"] == need["shape"]]
    coloured = [d for d in mine if d["color"] == need["color"]]
    return (coloured or mine or [None])[0]


def image_counts(requirement: dict, detected: list[dict]) -> Counts:
    relation = requirement["relation"]
    a, b = (_pick(detected, need) for need in requirement["objects"][:2])
    if a is None or b is None:
        return Counts(images=1)
    offset = (a["center"][0] - b["center"][0], a["center"][1] - b["center"][1])
    axis = AXIS[relation]
    on_axis = abs(offset[axis]) > abs(offset[1 - axis])
    right_way = on_axis and offset[axis] * SIGN[relation] > 0
    return Counts(1, 1, int(on_axis), int(right_way))


def position_counts(result: dict) -> dict[str, Counts]:
    """Relation word -> counts over the position images of one eval JSON."""
    out: dict[str, Counts] = {}
    for p in result["prompts"]:
        if p["category"] != "position":
            continue
        relation = p["requirement"]["relation"]
        for image in p["images"]:
            out[relation] = out.get(relation, Counts()) + image_counts(p["requirement"], image["detected"])
    return out


def _frac(n: int, d: int) -> str:
    return f"{n}/{d} ({n / d:.2f})" if d else "0/0"


def position_table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| model | relation | images | both shapes found | on the relation's axis | of those, the right way |",
             "|---|---|---:|---:|---:|---:|"]
    for label, result in rows:
        per = position_counts(result)
        for relation, c in [*sorted(per.items()), ("all", sum(per.values(), Counts()))]:
            name = f"**{relation}**" if relation == "all" else relation
            lines.append(f"| {label} | {name} | {c.images} | {c.both} | {_frac(c.on_axis, c.both)} | "
                         f"{_frac(c.right_way, c.on_axis)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+", help="LABEL=PATH to a marble eval JSON")
    ap.add_argument("--position", action="store_true", help="the position verdict split into axis and direction")
    args = ap.parse_args()
    rows = []
    for item in args.rows:
        label, _, path = item.partition("=")
        rows.append((label, json.loads(Path(path).read_text())))
    print(position_table(rows) if args.position else table(rows))


if __name__ == "__main__":
    main()
