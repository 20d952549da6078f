"""One markdown table from `marble eval` JSON files: GenEval / strict per category, side by side.

Each row is a (label, JSON) pair. Files written before the strict verdict existed (the shipped
model's eval-heldout.json and eval-seen.json) are judged again from their stored detections: the
strict verdict is a function of the detections and the prompt's requirement, so no image is redrawn.

    python benchmarks/eval_table.py shipped=docs/results/eval-heldout.json \
        mmdit=docs/results/builtin-v2-mmdit-eval-heldout.json
"""
from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+", help="LABEL=PATH to a marble eval JSON")
    args = ap.parse_args()
    rows = []
    for item in args.rows:
        label, _, path = item.partition("=")
        rows.append((label, json.loads(Path(path).read_text())))
    print(table(rows))


if __name__ == "__main__":
    main()
