"""What `--regions` costs: one controlled image of the built-in model with and without it, the two
interleaved in one process, medians (docs/controlnet-training.md#regions).

    python benchmarks/regions_speed.py --threads 2 --runs 15

The prompt and sketch are a held-out colour-attribution scene; every image is generated warm (one
untimed image of each kind first). Prints one line per variant and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--strength", type=float, default=0.5)
    args = ap.parse_args(argv)
    from marble.adapters.controlnet import ControlSpec
    from marble.checkpoints.resolve import load_model
    from marble.cli.compute import apply_threads
    from marble.cpu_features import cpu_label
    from marble.data.sketch import sketch
    from marble.eval.control import prompt_scenes
    from marble.eval.prompts import build_prompts
    from marble.pipeline import Pipeline

    apply_threads(args.threads)
    pipe = Pipeline(load_model("builtin", dtype=torch.float32))
    prompt = next(p for p in build_prompts("heldout") if p.category == "color_attr")
    spec = ControlSpec(image=sketch(prompt_scenes([prompt])[prompt.text]), model="builtin-sketch",
                       resize="Just Resize")
    variants = {"ControlNet": 0.0, f"ControlNet + regions {args.strength:g}": args.strength}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.runs + 1):
        for name, strength in variants.items():
            start = time.perf_counter()
            pipe.generate_image(prompt.text, seed=i, controls=(spec,), regions=strength)
            if i:
                times[name].append(time.perf_counter() - start)
    print(f"{cpu_label()}, {args.threads} threads, fp32, built-in model 64x64, DPM++ 2M Karras 15 steps, CFG 4; "
          f"{prompt.text!r}; medians of {args.runs}")
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, m in medians.items():
        print(f"  {name}: {m:.3f} s")
    a, b = medians.values()
    print(f"  ratio: {b / a:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
