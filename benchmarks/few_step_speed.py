"""Warm 64×64 images of several models, each with its own default settings, alternated image by
image in one process (eager and `--trace`), so their ratios are read on one machine state (issue
16's speed bar; docs/few-step.md). The same call drifts by a third between moments on these
machines, which is why `marble bench --model`, one model a process, only gives each one's time.

    python benchmarks/few_step_speed.py --models builtin,builtin-lcm,runs/x/model.safetensors --rounds 30 \
        --threads 2 [--json out.json]
"""
from __future__ import annotations

from marble.threads import quiet_spin

quiet_spin()   # as the CLI does

import argparse
import json
from pathlib import Path

import torch

from marble.cpu_features import cpu_label
from marble.fileio import write_new
from marble.pipeline import load_pipeline
from marble.request import GenerationRequest, resolve
from trace_overheads import PROMPT, medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="builtin,builtin-lcm", help="comma-separated; ratios are to the first")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    images = {}
    for i, name in enumerate(models):
        for trace in (False, True):
            pipe = load_pipeline(name, trace=trace)
            req = resolve(GenerationRequest(prompt=PROMPT, seed=0), pipe.defaults)
            images[(i, trace)] = (lambda p=pipe, r=req: p.generate(r), req)
    seconds = medians({k: f for k, (f, _) in images.items()}, args.rounds)
    label = cpu_label()
    print(f"{label}; {torch.get_num_threads()} threads; medians of {args.rounds} images, alternated\n")
    print("| model | settings | eager | traced | traced, to the first |\n|---|---|---:|---:|---:|")
    first = seconds[(0, True)]
    rows = []
    for i, name in enumerate(models):
        req = images[(i, False)][1]
        settings = f"{req.sampler}, {req.steps} steps, CFG {req.cfg:g}"
        eager, traced = seconds[(i, False)], seconds[(i, True)]
        rows.append({"model": name, "settings": settings, "eager_s": eager, "traced_s": traced})
        print(f"| {name} | {settings} | {eager * 1e3:.1f} ms | {traced * 1e3:.1f} ms | {traced / first:.3f} |")
    if args.json:
        record = {"cpu": label, "threads": torch.get_num_threads(), "rounds": args.rounds, "prompt": PROMPT, "rows": rows}
        write_new(args.json, json.dumps(record, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
