"""The overfitting curve of a LoRA run: the detector's score on the `concept` (training-like) and
`concept-new` (combinations never shown) prompts for each snapshot `marble train lora` wrote
(lora.snapshot_every), with the base model (step 0) first. One process, the base model loaded once,
each snapshot applied with the unfused overlay (nothing accumulates between points).

    python benchmarks/lora_curve.py RUN_DIR --json OUT.json --png OUT.png [--prompts 24] [--seeds 2] [--every 50]

Two numbers per split and point: "heart drawn" (heart_drawn: the heart in the prompt's colour, and
in counting prompts its number; partner and relation not judged) and the eval's overall score
(the mean of the six categories, position and colour binding included, where the base model is
weak). The PNG plots both against training steps. Each
point is `--prompts` prompts × `--seeds` seeds per split, the model's default sampler settings.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import time
from pathlib import Path

import torch

from marble.adapters.lora import LoraUse, overlay
from marble.adapters.lora_files import read_lora
from marble.adapters.lora_table import module_table
from marble.eval.benchmark import run_benchmark
from marble.eval.prompts import build_prompts, scale_counts
from marble.fileio import write_new
from marble.pipeline import load_pipeline

SPLITS = ("concept", "concept-new")


def snapshots(run_dir: Path, every: int) -> list[tuple[int, Path | None]]:
    found = []
    for path in sorted((run_dir / "snapshots").glob("step-*.safetensors")):
        step = int(re.fullmatch(r"step-(\d+)\.safetensors", path.name).group(1))
        if step % every == 0:
            found.append((step, path))
    return [(0, None)] + found


def shape_drawn(requirement: dict, detected: list[dict], shape: str = "heart", colour: bool = True) -> bool:
    """`shape` as the prompt asks for it: in its colour where the prompt names one (unless not
    `colour`), and in counting prompts exactly as many; the partner shape and the relation are not judged."""
    found = [d for d in detected if d["shape"] == shape]
    for need in requirement["objects"]:
        if need["shape"] != shape:
            continue
        mine = [d for d in found if d["color"] == need["color"]] if need.get("color") and colour else found
        if requirement["category"] == "counting" and len(found) != need.get("count", 1):
            return False
        if not mine:
            return False
    return True


def heart_drawn(requirement: dict, detected: list[dict], colour: bool = True) -> bool:
    """The heart as the prompt asks for it (shape_drawn for the heart)."""
    return shape_drawn(requirement, detected, "heart", colour)


def heart_score(report: dict, colour: bool = True) -> float:
    """The share of images with the heart drawn as asked (heart_drawn), over all prompts of a split."""
    verdicts = [heart_drawn(p["requirement"], im["detected"], colour) for p in report["prompts"] for im in p["images"]]
    return sum(verdicts) / len(verdicts)


def score(pipe, lora, prompts, seeds) -> dict:
    uses = [] if lora is None else [LoraUse(lora)]
    with overlay(pipe.model, uses):
        result = run_benchmark(lambda p, s: pipe.generate_image(p, seed=s), prompts, seeds)
    report = result.to_dict()
    return {"overall": report["overall"], "heart": heart_score(report), "heart_any_colour": heart_score(report, False),
            "categories": report["categories"],
            "images": report["images"]}


def plot(points: list[dict], path: Path, title: str, width: int = 760, height: int = 440) -> None:
    """Both splits' scores against steps, drawn with Pillow (as marble/train/plot.py draws the loss):
    solid lines "heart as asked", dashed "heart, any colour" where measured, thin the eval's overall."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 50, 20, 30, 110
    s1 = max(p["step"] for p in points) or 1

    def xy(step, value):
        return (left + (width - left - right) * step / s1, height - bottom - (height - top - bottom) * value)

    draw.rectangle([left, top, width - right, height - bottom], outline="gray")
    for v in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0):
        x0, y = xy(0, v)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225) if v != 0.9 else (200, 200, 200))
        draw.text((8, y - 6), f"{v:.2f}", fill="black")
    for p in points:
        x, y = xy(p["step"], 0)
        draw.text((x - 8, y + 4), str(p["step"]), fill="black")
    draw.text((width // 2 - 40, height - bottom + 20), "training step", fill="black")
    draw.text((left, 8), title, fill="black")
    legend_y = height - bottom + 40
    colours = {"concept": (31, 119, 180), "concept-new": (255, 127, 14)}
    for i, split in enumerate(SPLITS):
        colour = colours[split]
        label = "training-like (concept)" if split == "concept" else "new combinations (concept-new)"
        series = [("heart", 3, f"{label}: heart drawn as asked"),
                  ("heart_any_colour", 1, f"{label}: heart, any colour"),
                  ("overall", 1, f"{label}: eval overall (6 categories)")]
        for j, (key, w, text) in enumerate(series):
            if not all(key in p[split] for p in points):
                continue
            line = [xy(p["step"], p[split][key]) for p in points]
            faded = colour if key == "heart" else tuple(int(c + (255 - c) * (0.35 if key == "heart_any_colour" else 0.6))
                                                        for c in colour)
            draw.line(line, fill=faded, width=w)
            for x, y in line:
                if key == "heart":
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            ly = legend_y + 14 * j
            lx = left + i * (width - left) // 2
            draw.line([(lx, ly + 6), (lx + 24, ly + 6)], fill=faded, width=w)
            draw.text((lx + 30, ly), text, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_new(path, buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--png", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--every", type=int, default=50, help="use the snapshots at multiples of this step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--replot", type=Path, help="only draw --png from this curve JSON (a finished run)")
    args = ap.parse_args()
    if args.replot:
        report = json.loads(args.replot.read_text())
        plot(report["points"], args.png, title(report))
        return
    for path in (args.json, args.png):
        if path.exists():
            raise SystemExit(f"{path} already exists; not overwritten")
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    table = module_table(pipe.model)
    prompts = {split: build_prompts(split, scale_counts(args.prompts)) for split in SPLITS}
    seeds = list(range(args.seeds))
    points = []
    start = time.perf_counter()
    for step, path in snapshots(args.run_dir, args.every):
        lora = None if path is None else read_lora(path, table)
        point = {"step": step, **{split: score(pipe, lora, prompts[split], seeds) for split in SPLITS}}
        points.append(point)
        print(f"step {step:5d}: heart drawn: concept {point['concept']['heart']:.3f} concept-new "
              f"{point['concept-new']['heart']:.3f}; eval overall: concept {point['concept']['overall']:.3f} "
              f"concept-new {point['concept-new']['overall']:.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    report = {"run_dir": str(args.run_dir), "model": args.model, "model_hash": pipe.loaded.hash,
              "prompts": {s: len(p) for s, p in prompts.items()}, "seeds": seeds,
              "seconds": round(time.perf_counter() - start, 1), "points": points}
    write_new(args.json, (json.dumps(report, indent=1) + "\n").encode())
    plot(points, args.png, title(report))


def title(report: dict) -> str:
    n = report["prompts"]
    return (f"heart LoRA on the built-in model ({report['run_dir']}): {n['concept']} + {n['concept-new']} prompts "
            f"x {len(report['seeds'])} seeds per point")


if __name__ == "__main__":
    main()
