"""What a LoRA for a new shape can reach on the built-in model: the base model's own score on the
`concept` prompts with the heart replaced by a shape it was trained on.

The heart LoRA is judged by "heart drawn as asked" (benchmarks/lora_curve.py): the heart in the
prompt's colour and, in counting prompts, exactly as many. A LoRA that taught the heart perfectly
would make the heart as reliable as the shapes the model already knows, no more: two-object scenes
still swap colours and counts still miss (the base model's own weaknesses, docs/eval.md). This
script measures that ceiling: the same prompts and seeds, "heart" replaced by SHAPE (a shape that is
never a heart partner in the `concept` split: star or cross), scored with the same rule. Prompts
whose substituted (colour, shape) pair the base world holds back are reported apart.

    python benchmarks/lora_ceiling.py --shape star --shape cross --json ceiling.json [--prompts 60] [--seeds 4]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_curve import shape_drawn  # noqa: E402

from marble.data import concept
from marble.eval.benchmark import run_benchmark
from marble.eval.prompts import Prompt, build_prompts, is_heldout, scale_counts
from marble.fileio import write_new
from marble.pipeline import load_pipeline


def substitute(prompt: Prompt, shape: str) -> Prompt:
    """The prompt with the concept shape replaced by `shape`, in its text and its requirement."""
    heart = concept.CONCEPT_SHAPE
    text = re.sub(rf"\b{heart}(s?)\b", lambda m: shape + m.group(1), prompt.text)
    req = prompt.requirement
    objects = tuple(dataclasses.replace(o, shape=shape) if o.shape == heart else o for o in req.objects)
    return Prompt(text, dataclasses.replace(req, objects=objects))


def score(rows: list[dict], shape: str) -> dict:
    """Share of images with `shape` drawn as asked, overall and per category."""
    out: dict[str, list[bool]] = {}
    for row in rows:
        for im in row["images"]:
            out.setdefault(row["category"], []).append(shape_drawn(row["requirement"], im["detected"], shape))
    every = [v for vs in out.values() for v in vs]
    return {"as_asked": sum(every) / max(1, len(every)), "images": len(every),
            "categories": {c: round(sum(vs) / len(vs), 3) for c, vs in out.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", action="append", required=True, choices=("star", "cross"))
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.json.exists():
        raise SystemExit(f"{args.json} already exists; not overwritten")
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    base = build_prompts("concept", scale_counts(args.prompts))
    seeds = list(range(args.seeds))
    report = {"model": args.model, "model_hash": pipe.loaded.hash, "prompts": len(base), "seeds": seeds, "shapes": {}}
    for shape in args.shape:
        start = time.perf_counter()
        prompts = [substitute(p, shape) for p in base]
        result = run_benchmark(lambda p, s: pipe.generate_image(p, seed=s), prompts, seeds).to_dict()
        held = [is_heldout(p.requirement) for p in prompts]
        rows = result["prompts"]
        report["shapes"][shape] = {
            "all": score(rows, shape),
            "seen_pairs_only": score([r for r, h in zip(rows, held) if not h], shape),
            "heldout_pairs_only": score([r for r, h in zip(rows, held) if h], shape),
            "eval": {"overall": result["overall"], "categories": result["categories"]},
            "seconds": round(time.perf_counter() - start, 1)}
        s = report["shapes"][shape]
        print(f"{shape}: as asked {s['all']['as_asked']:.3f} ({s['all']['images']} images); seen pairs only "
              f"{s['seen_pairs_only']['as_asked']:.3f} ({s['seen_pairs_only']['images']}); per category "
              f"{s['all']['categories']}  ({s['seconds']:.0f} s)", flush=True)
    write_new(args.json, (json.dumps(report, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
