"""The quality cost and the time saved of each opt-in approximation (DeepCache, ToMe, dynamic
int8; docs/bench.md, "Approximations"): every prompt's image with the approximation against the
exact path's image of the same seed (PSNR over 8-bit RGB), and the time per image, at the model's
default settings. Variants run interleaved prompt by prompt, so a busy machine slows each alike.

    python benchmarks/approximations.py --model builtin --prompts 16 --threads 1
    python benchmarks/approximations.py --random-sd sd15 --size 512 --steps 20 --prompts 2 --threads 2
    python benchmarks/approximations.py --random-sd sd15 --size 512 --steps 20 --prompts 2 --threads 2 \
        --variants "ToMe 0.5 + int8,bf16,bf16 + ToMe 0.5"

`--variants` picks rows beside the exact fp32 one. bf16 compute is itself measured against fp32:
it is the exact path where the CPU has native bf16 (`--dtype auto`), and the image still differs.

`--random-sd PRESET` runs the SD architecture with seeded random weights (marble.eval.sd_bench's
random_sd_model, as `marble bench`): the issue asks for each approximation's cost on SD-shaped
weights too, where 4096-token maps make ToMe and DeepCache's skipped blocks large. Its images are
warmed with one small image per variant, not a full one.
"""
from __future__ import annotations

from marble.threads import quiet_spin

quiet_spin()   # as the CLI does: libgomp's short spin, read when torch loads

import argparse
import math
import statistics
import time

import numpy as np
import torch

from marble.checkpoints.resolve import LoadedModel
from marble.cpu_features import cpu_label
from marble.eval.sd_bench import psnr, random_sd_model
from marble.pipeline import Pipeline, load_pipeline
from marble.request import GenerationRequest, resolve

# the built-in model's world: coloured shapes and their relations (marble.data.shapes)
PROMPTS = (
    "a red circle above a blue square", "a green triangle to the left of a yellow circle",
    "two blue squares", "a purple star below an orange circle", "a yellow square on a white background",
    "three red circles", "a small green circle to the right of a large red triangle",
    "a blue triangle above a green square", "an orange square below a purple circle", "a white star",
    "a red square to the left of a blue circle", "two yellow triangles above a red circle",
    "a large blue circle", "a green square to the right of an orange triangle",
    "a purple circle above a yellow star", "four small red squares",
)

# name -> (request fields, pipeline: fp32, int8 (the U-Net's Linear layers quantised) or bf16 compute)
VARIANTS = {
    "exact": ({}, "fp32"),
    "DeepCache 2": ({"deepcache": 2}, "fp32"),
    "DeepCache 3": ({"deepcache": 3}, "fp32"),
    "ToMe 0.5": ({"tome": 0.5}, "fp32"),
    "int8": ({}, "int8"),
    "DeepCache 3 + ToMe 0.5 + int8": ({"deepcache": 3, "tome": 0.5}, "int8"),
    "ToMe 0.5 + int8": ({"tome": 0.5}, "int8"),
    "bf16": ({}, "bf16"),   # exact where bf16 is native (--dtype auto), an approximation of fp32 all the same
    "bf16 + ToMe 0.5": ({"tome": 0.5}, "bf16"),
}
DEFAULT_VARIANTS = ("DeepCache 2", "DeepCache 3", "ToMe 0.5", "int8", "DeepCache 3 + ToMe 0.5 + int8")


def pipelines(kinds: set[str], model: str | None = None, random_sd: str | None = None) -> dict[str, Pipeline]:
    """One pipeline per kind, each on its own copy of the same weights (quantising rewrites the U-Net in
    place): `model` loaded by name or path, or `random_sd`'s architecture with seeded random weights."""
    def one(kind: str) -> Pipeline:
        quantize = "int8" if kind == "int8" else None
        if random_sd is None:
            return load_pipeline(model, torch.bfloat16 if kind == "bf16" else torch.float32, quantize=quantize)
        weights = random_sd_model(random_sd)
        return Pipeline(LoadedModel(weights.to(torch.bfloat16) if kind == "bf16" else weights, random_sd, "random"),
                        quantize=quantize)
    return {kind: one(kind) for kind in sorted(kinds)}


def measure(pipes: dict[str, Pipeline], prompts: int, seed: int, report=None, report_every: int = 4,
            size: int | None = None, steps: int | None = None, warm_size: int | None = None,
            variants: tuple[str, ...] = DEFAULT_VARIANTS) -> dict[str, dict]:
    """Rows per variant; `report(rows, done)` is called after every `report_every` prompts (a long run
    on a busy machine leaves its partial table behind). `size`, `steps`: None for the model's defaults;
    `warm_size`: the side of the warm-up image (None: a full image); `variants`: names of VARIANTS,
    "exact" first (the reference)."""
    chosen = {name: VARIANTS[name] for name in ("exact", *variants)}
    images: dict[str, list[np.ndarray]] = {name: [] for name in chosen}
    seconds: dict[str, list[float]] = {name: [] for name in chosen}
    shape = ({} if size is None else {"width": size, "height": size}) | {"steps": steps}
    warm = shape if warm_size is None else {"width": warm_size, "height": warm_size, "steps": 2}
    for name, (fields, kind) in chosen.items():   # warm each path once (first-call allocations)
        pipe = pipes[kind]
        pipe.generate(resolve(GenerationRequest(prompt=PROMPTS[0], seed=seed, **warm | fields),
                              pipe.defaults))
    for i, prompt in enumerate(PROMPTS[:prompts]):
        for name, (fields, kind) in chosen.items():
            pipe = pipes[kind]
            request = resolve(GenerationRequest(prompt=prompt, seed=seed + i, **shape | fields),
                              pipe.defaults)
            t0 = time.perf_counter()
            image = pipe.generate(request).images[0]
            seconds[name].append(time.perf_counter() - t0)
            images[name].append(np.asarray(image))
        if report is not None and (i + 1) % report_every == 0 and i + 1 < prompts:
            report(summary(images, seconds), i + 1)
    return summary(images, seconds)


def summary(images: dict[str, list[np.ndarray]], seconds: dict[str, list[float]]) -> dict[str, dict]:
    exact_time = statistics.median(seconds["exact"])
    out = {}
    for name in images:
        scores = [psnr(a, b) for a, b in zip(images[name], images["exact"])]
        finite = [s for s in scores if math.isfinite(s)]
        t = statistics.median(seconds[name])
        out[name] = {"psnr_mean": statistics.mean(finite) if finite else math.inf,
                     "psnr_min": min(scores), "seconds": t, "ratio": t / exact_time}
    return out


def markdown(rows: dict[str, dict], header: str) -> str:
    lines = [header, "", "| variant | PSNR vs exact, mean (dB) | min (dB) | s / image (median) | × exact |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        mean = "exact" if math.isinf(r["psnr_mean"]) else f"{r['psnr_mean']:.1f}"
        low = "exact" if math.isinf(r["psnr_min"]) else f"{r['psnr_min']:.1f}"
        lines.append(f"| {name} | {mean} | {low} | {r['seconds']:.3f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--random-sd", metavar="PRESET", help="an SD architecture with seeded random weights "
                        "(sd15, sd21, ...) instead of --model")
    parser.add_argument("--size", type=int, help="image side in pixels (default: the model's)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    parser.add_argument("--variants", help=f"comma-separated, beside exact, from: {', '.join(VARIANTS)} "
                        f"(default: {', '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = DEFAULT_VARIANTS if args.variants is None else tuple(v.strip() for v in args.variants.split(","))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    kinds = {VARIANTS[v][1] for v in ("exact", *variants)}
    pipes = pipelines(kinds, args.model, args.random_sd)
    model = f"{args.random_sd} (random weights)" if args.random_sd else args.model
    d = pipes["fp32"].defaults
    settings = (f"{args.size or d.width}², {d.sampler}, {args.steps or d.steps} steps, CFG {d.cfg:g}"
                if args.size or args.steps or args.random_sd else "default settings")
    def header(done: int) -> str:
        return (f"{model}, {settings}, {done} prompts, seeds {args.seed}+i, "
                f"{torch.get_num_threads()} thread(s), {cpu_label()}, torch {torch.__version__}")

    rows = measure(pipes, args.prompts, args.seed, size=args.size, steps=args.steps,
                   warm_size=64 if args.random_sd else None, report_every=1 if args.random_sd else 4,
                   variants=tuple(v for v in variants if v != "exact"),
                   report=lambda partial, done: print(markdown(partial, "(partial) " + header(done)) + "\n", flush=True))
    print(markdown(rows, header(args.prompts)))


if __name__ == "__main__":
    main()
