"""`marble eval --control sketch`: the benchmark with a sketch of each prompt's scene as control.

Every benchmark prompt has its scene in the world: `truth_scene(requirement, 0)` (marble/eval/
prompts.py), the arrangement the groundtruth baseline draws, which satisfies the prompt. Its
sketch (marble/data/sketch.py) is the control image and the prompt is the caption, so the
detector's verdicts ask whether the model drew what the sketch and the caption say. A text that
recurs across categories (single_object and colors) keeps the scene of its first prompt: the
benchmark generates it once per seed. The same prompts and seeds run without the ControlNet too,
and the report puts the two side by side.

`--scenes image` gives every image a scene of its own instead, `truth_scene(requirement, 1000 +
seed)`: a prompt's seeds then draw different layouts, so a category's score rests on as many
layouts as images rather than on the few dozen that one scene per prompt gives (34 counting
prompts share 17 scenes, and one hard object in one scene moves the score by 8 images).
"""
from __future__ import annotations

from typing import Callable, Sequence

from PIL import Image

from marble.data.scene import Scene
from marble.data.sketch import sketch
from marble.eval.prompts import Prompt, Requirement, truth_scene

# the bar for the built-in ControlNet on held-out compositions (GenEval accuracy)
BAR = {"position": 0.95, "counting": 0.95, "color_attr": 0.90}
SCENE_SEED = 0
IMAGE_SCENE_SEED = 1000       # --scenes image: seed s sketches scene 1000 + s, never a per-prompt scene
SCENES_PER = ("prompt", "image")


def _first_requirements(prompts: Sequence[Prompt]) -> dict[str, Requirement]:
    first: dict[str, Requirement] = {}
    for p in prompts:
        first.setdefault(p.text, p.requirement)
    return first


def prompt_scenes(prompts: Sequence[Prompt], size: int = 64, full: Sequence[Prompt] = ()) -> dict[str, Scene]:
    """text -> the scene sketched for it, deterministic: the truth scene of the text's first prompt
    in `full` (the whole run's prompts: a --categories subset then sketches what the full run
    does; a text of two_objects and color_attr has each category's requirement, and so its own
    scene), else in `prompts`."""
    first = _first_requirements([*full, *prompts])
    return {text: truth_scene(first[text], SCENE_SEED, size) for text in dict.fromkeys(p.text for p in prompts)}


def image_key(text: str, seed: int) -> str:
    return f"{text} #{seed}"


def image_scenes(prompts: Sequence[Prompt], seeds: Sequence[int], size: int = 64,
                 full: Sequence[Prompt] = ()) -> dict[str, Scene]:
    """image_key(text, seed) -> a scene of its own for each image (`--scenes image`), deterministic;
    the requirement is chosen as in prompt_scenes."""
    first = _first_requirements([*full, *prompts])
    return {image_key(text, seed): truth_scene(first[text], IMAGE_SCENE_SEED + seed, size)
            for text in dict.fromkeys(p.text for p in prompts) for seed in seeds}


def scene_keys(per: str) -> Callable[[str, int], str]:
    """How an image (text, seed) finds its scene: by its text alone, or by text and seed."""
    return {"prompt": lambda text, seed: text, "image": image_key}[per]


def sketch_source(generate_controlled: Callable[[str, int, Image.Image], Image.Image], scenes: dict[str, Scene],
                  size: int, key: Callable[[str, int], str] = scene_keys("prompt")) -> Callable[[str, int], Image.Image]:
    """The benchmark's `generate(prompt, seed)`, controlled by the sketch of the image's scene."""
    sketches = {k: sketch(scene, size) for k, scene in scenes.items()}
    return lambda prompt, seed: generate_controlled(prompt, seed, sketches[key(prompt, seed)])


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
