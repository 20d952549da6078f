"""`marble eval --control sketch`: the benchmark with a sketch of each prompt's scene as control.

Every benchmark prompt has its scene in the world: `truth_scene(requirement, 0)` (marble/eval/
prompts.py), the arrangement the groundtruth baseline draws, which satisfies the prompt. Its
sketch (marble/data/sketch.py) is the control image and the prompt is the caption, so the
detector's verdicts ask whether the model drew what the sketch and the caption say. A text that
recurs across categories (single_object and colors) keeps the scene of its first prompt: the
benchmark generates it once per seed. The same prompts and seeds run without the ControlNet too,
and the report puts the two side by side.
"""
from __future__ import annotations

from typing import Callable, Sequence

from PIL import Image

from marble.data.scene import Scene
from marble.data.sketch import sketch
from marble.eval.prompts import Prompt, truth_scene

# the bar for the built-in ControlNet on held-out compositions (GenEval accuracy)
BAR = {"position": 0.95, "counting": 0.95, "color_attr": 0.90}
SCENE_SEED = 0


def prompt_scenes(prompts: Sequence[Prompt], size: int = 64) -> dict[str, Scene]:
    """text -> the scene sketched for it (its first prompt's truth scene), deterministic."""
    scenes: dict[str, Scene] = {}
    for p in prompts:
        if p.text not in scenes:
            scenes[p.text] = truth_scene(p.requirement, SCENE_SEED, size)
    return scenes


def sketch_source(generate_controlled: Callable[[str, int, Image.Image], Image.Image], scenes: dict[str, Scene],
                  size: int) -> Callable[[str, int], Image.Image]:
    """The benchmark's `generate(prompt, seed)`, controlled by the sketch of the prompt's scene."""
    sketches = {text: sketch(scene, size) for text, scene in scenes.items()}
    return lambda prompt, seed: generate_controlled(prompt, seed, sketches[prompt])


def side_by_side(with_control: dict, without_control: dict | None) -> dict:
    """Per category and overall: GenEval and strict accuracy with the ControlNet and without it
    (None where the run without it was skipped: `--control-only`)."""
    without_control = without_control or {"categories": {}}
    out = {}
    for cat, c in with_control["categories"].items():
        w = without_control["categories"].get(cat, {})
        out[cat] = {"with": c["accuracy"], "without": w.get("accuracy"),
                    "strict_with": c["strict_accuracy"], "strict_without": w.get("strict_accuracy")}
    out["overall"] = {"with": with_control["overall"], "without": without_control.get("overall"),
                      "strict_with": with_control["overall_strict"],
                      "strict_without": without_control.get("overall_strict")}
    return out


def bar_verdict(table: dict) -> dict:
    """The bar's categories that were measured: required accuracy, measured, and whether it is met."""
    return {cat: {"required": need, "measured": table[cat]["with"], "met": table[cat]["with"] >= need}
            for cat, need in BAR.items() if cat in table}


def comparison_table(table: dict) -> str:
    lines = ["| category | with ControlNet | without | strict with | strict without |", "|---|---:|---:|---:|---:|"]
    for cat, r in table.items():
        b = "**" if cat == "overall" else ""
        lines.append(f"| {b}{cat}{b} | {r['with']:.3f} | {r['without']:.3f} | {r['strict_with']:.3f} "
                     f"| {r['strict_without']:.3f} |")
    return "\n".join(lines)
