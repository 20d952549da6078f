"""Does a model place the two named objects along the relation's axis, and in the right order?

GenEval's position verdict mixes two things a model can learn apart: the *axis* a relation word
names ("above"/"below" are vertical, "left of"/"right of" horizontal) and the *direction*, which of
the two named objects comes first. This splits them, from the detections stored in `marble eval`
JSON files (no image is redrawn). For each position image in which both named shapes were found
(the prompt's colour preferred, as marble.eval.verdict picks them), it takes the first detection of
each, and asks whether the centre offset's larger component lies on the relation's axis, and
if so whether its sign is the relation's. Chance is 0.5 for either question.

    python benchmarks/position_axis.py shipped=docs/results/eval-heldout.json \
        coords=docs/results/builtin-v2-coords/eval-heldout.json
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

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


def markdown(rows: list[tuple[str, dict]]) -> str:
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="+", help="LABEL=PATH to a marble eval JSON")
    args = ap.parse_args()
    rows = []
    for row in args.rows:
        label, _, path = row.partition("=")
        rows.append((label, json.loads(Path(path).read_text())))
    print(markdown(rows))


if __name__ == "__main__":
    main()
