"""The heart LoRA's result table from `marble eval --json` files: per file the six categories, the
overall score and, on the concept splits, the "heart drawn" share (lora_curve.heart_drawn).

    python benchmarks/lora_table.py LABEL=EVAL.json [LABEL=EVAL.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lora_curve import heart_score  # noqa: E402

from marble.eval.prompts import CATEGORIES  # noqa: E402


def row(label: str, report: dict) -> str:
    cats = report["categories"]
    concept = report["split"].startswith("concept")
    heart = f"{heart_score(report):.3f} | {heart_score(report, False):.3f}" if concept else " | "
    lora = ", ".join(f"{x['name']}:{x['weight']:g}" for x in report.get("loras", [])) or "—"
    cells = [f"{cats[c]['accuracy']:.3f}" if c in cats else "" for c in CATEGORIES]
    return (f"| {label} | {report['split']} | {lora} | {heart} | " + " | ".join(cells)
            + f" | **{report['overall']:.3f}** | {report['images']} |")


def main() -> None:
    print("| run | split | LoRA | heart as asked | heart, any colour | " + " | ".join(CATEGORIES) + " | overall | images |")
    print("|---|---|---|---:|---:|" + "---:|" * len(CATEGORIES) + "---:|---:|")
    for arg in sys.argv[1:]:
        label, _, path = arg.partition("=")
        print(row(label, json.loads(Path(path).read_text())))


if __name__ == "__main__":
    main()
