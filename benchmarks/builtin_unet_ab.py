"""One U-Net call of the built-in model, eager against channels-last and against a TorchScript
trace (with --freeze, also the trace frozen and through torch.jit.optimize_for_inference; with
--compile, torch.compile), interleaved in one process (medians), with the largest output
difference of each.

    python benchmarks/builtin_unet_ab.py --threads 1 --calls 25 [--compile] [--freeze] [--model builtin-lcm]
"""
from __future__ import annotations

from marble.threads import quiet_spin

quiet_spin()   # as the CLI does: libgomp's short spin, read when torch loads

import argparse
import copy
import statistics
import time
import warnings

import torch

from marble.models.traced import TracedNetwork
from marble.pipeline import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--calls", type=int, default=25)
    parser.add_argument("--compile", action="store_true",
                        help="also torch.compile(unet, dynamic=False) (inductor; its compile time is printed)")
    parser.add_argument("--freeze", action="store_true",
                        help="also the trace after torch.jit.freeze, and after torch.jit.optimize_for_inference")
    parser.add_argument("--model", default="builtin")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unet = load_pipeline(args.model).model.unet.eval()
    nhwc = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    traced = TracedNetwork(unet)
    compiled = torch.compile(unet, dynamic=False) if args.compile else None
    print("| batch | variant | median ms | max |output − eager| |\n|---|---|---|---|")
    with torch.inference_mode():
        for batch in (2, 1):   # CFG's batch, and the conditional branch alone (few-step models)
            x, t, ctx = torch.randn(batch, 4, 16, 16), torch.full((batch,), 500.0), torch.randn(batch, 32, 384)
            variants = {"eager": lambda: unet(x, t, ctx),
                        "channels-last": lambda: nhwc(x.contiguous(memory_format=torch.channels_last), t, ctx),
                        "traced": lambda: traced(x, t, ctx)}
            if args.freeze:
                with warnings.catch_warnings():   # the tracer's constant warnings, as TracedNetwork silences them
                    warnings.simplefilter("ignore")
                    frozen = torch.jit.freeze(torch.jit.trace(unet, (x, t, ctx), check_trace=False))
                    optimized = torch.jit.optimize_for_inference(
                        torch.jit.freeze(torch.jit.trace(unet, (x, t, ctx), check_trace=False)))
                variants["frozen trace"] = lambda: frozen(x, t, ctx)
                variants["optimize_for_inference"] = lambda: optimized(x, t, ctx)
            if compiled is not None:
                start = time.perf_counter()
                compiled(x, t, ctx)
                print(f"torch.compile, batch {batch}: {time.perf_counter() - start:.1f} s to compile and run once")
                variants["compiled"] = lambda: compiled(x, t, ctx)
            reference = unet(x, t, ctx)
            diffs = {k: float((f() - reference).abs().max()) for k, f in variants.items()}   # also traces
            for f in variants.values():   # TorchScript optimises a trace over its first calls
                f(), f()
            times = {k: [] for k in variants}
            for _ in range(args.calls):
                for k, f in variants.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
            for k in variants:
                print(f"| {batch} | {k} | {statistics.median(times[k]) * 1e3:.1f} | {diffs[k]:.2e} |")


if __name__ == "__main__":
    main()
