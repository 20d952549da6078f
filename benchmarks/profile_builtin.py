"""Where one warm image of the built-in model spends its time (issue 18, item 6's last target).

By component (text encoder, U-Net, VAE decode, and the rest: sampler, guidance, PNG-free Python),
and inside the U-Net by operator category as benchmarks/profile_unet.py sorts them; "Python in
the U-Net" is the time inside U-Net calls that no operator accounts for.

    python benchmarks/profile_builtin.py --threads 2
"""
from __future__ import annotations

from marble.threads import quiet_spin

quiet_spin()   # as the CLI does: libgomp's short spin, read when torch loads

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from marble.cpu_features import cpu_name
from marble.pipeline import load_pipeline
from marble.request import GenerationRequest, resolve
from profile_unet import CATEGORY_OF

PROMPT = "two red circles above a blue square"


def labelled(fn, label: str):
    def call(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default="builtin", help="builtin, builtin-lcm or a model file")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's card (15 for builtin)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    m = pipe.model
    req = resolve(GenerationRequest(prompt=PROMPT, seed=0, steps=args.steps), pipe.defaults)
    pipe.generate(req)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        pipe.generate(req)
        times.append(time.perf_counter() - t0)
    m.unet.forward = labelled(m.unet.forward, "unet")
    m.text_encoder.forward = labelled(m.text_encoder.forward, "text encoder")
    m.vae.decode = labelled(m.vae.decode, "vae decode")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        pipe.generate(req)
        profiled = time.perf_counter() - t0
    events = {e.key: e for e in prof.key_averages()}
    component = {k: events[k].cpu_time_total for k in ("unet", "text encoder", "vae decode") if k in events}
    total = profiled * 1e6
    median = statistics.median(times)
    print(f"{args.model}; CPU: {cpu_name()}, {torch.get_num_threads()} threads; {req.width}x{req.height}, {req.sampler}, "
          f"{req.steps} steps, CFG {req.cfg:g}")
    print(f"warm image: median {median:.3f} s of {args.runs}; the profiled run took {profiled:.3f} s\n")
    print("| component | share of the profiled image | seconds (scaled to the median) |\n|---|---|---|")
    for name, us in [*component.items(), ("rest (sampler, guidance, Python)", total - sum(component.values()))]:
        print(f"| {name} | {us / total:.1%} | {us / total * median:.3f} |")
    inside: dict[str, float] = defaultdict(float)   # U-Net operators by category: only the U-Net's frames
    for event in prof.events():
        if event.name == "unet":
            for child in _descendants(event):
                inside[CATEGORY_OF.get(child.name.removeprefix("aten::"), "other")] += child.self_cpu_time_total
            inside["Python in the U-Net"] += event.self_cpu_time_total
    unet_total = sum(inside.values())
    print("\n| inside the U-Net | share of U-Net time |\n|---|---|")
    for cat in sorted(inside, key=inside.get, reverse=True):
        print(f"| {cat} | {inside[cat] / unet_total:.1%} |")


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


if __name__ == "__main__":
    main()
