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


def heart_drawn(requirement: dict, detected: list[dict]) -> bool:
    """The heart as the prompt asks for it: in its colour where the prompt names one, and in
    counting prompts exactly as many; the partner shape and the relation are not judged."""
    hearts = [d for d in detected if d["shape"] == "heart"]
    for need in requirement["objects"]:
        if need["shape"] != "heart":
            continue
        mine = [d for d in hearts if d["color"] == need["color"]] if need.get("color") else hearts
        if requirement["category"] == "counting" and len(hearts) != need.get("count", 1):
            return False
        if not mine:
            return False
    return True


def heart_score(report: dict) -> float:
    """The share of images with the heart drawn as asked (heart_drawn), over all prompts of a split."""
    verdicts = [heart_drawn(p["requirement"], im["detected"]) for p in report["prompts"] for im in p["images"]]
    return sum(verdicts) / len(verdicts)


def score(pipe, lora, prompts, seeds) -> dict:
    uses = [] if lora is None else [LoraUse(lora)]
    with overlay(pipe.model, uses):
        result = run_benchmark(lambda p, s: pipe.generate_image(p, seed=s), prompts, seeds)
    report = result.to_dict()
    return {"overall": report["overall"], "heart": heart_score(report), "categories": report["categories"],
            "images": report["images"]}


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    steps = [p["step"] for p in points]
    for split, colour in zip(SPLITS, ("tab:blue", "tab:orange")):
        label = "training-like (concept)" if split == "concept" else "new combinations (concept-new)"
        ax.plot(steps, [p[split]["heart"] for p in points], "o-", color=colour, lw=2, label=f"{label}: heart drawn")
        ax.plot(steps, [p[split]["overall"] for p in points], "s--", color=colour, lw=1, ms=3,
                label=f"{label}: eval overall")
    ax.set_xlabel("training step")
    ax.set_ylabel("share of images (detector)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
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
    args = ap.parse_args()
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
    n = {s: len(p) for s, p in prompts.items()}
    plot(points, args.png, f"LoRA on the built-in model: the heart  ({n['concept']} + {n['concept-new']} prompts "
                           f"× {len(seeds)} seeds per point)")


if __name__ == "__main__":
    main()
