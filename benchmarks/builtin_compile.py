"""The built-in U-Net's call, eager vs TorchScript trace vs torch.compile, side by side in one process.

One call at CFG batch 2 (16x16x4 latent, 32 MiniLM tokens), the three variants interleaved, medians
of 30 after 3 warm-up rounds; prints the compile time and each variant's largest difference from
eager (docs/bench.md, "torch.compile, tried").

    python benchmarks/builtin_compile.py [--threads 2] [--calls 30]
"""
from __future__ import annotations

from marble.threads import quiet_spin

quiet_spin()   # as the CLI does: libgomp's short spin, read when torch loads

import argparse
import statistics
import time

import torch

from marble.checkpoints.resolve import load_model
from marble.models.traced import TracedNetwork


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("builtin").model
    unet = model.unet.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 32, model.config.unet.context_dim, generator=g)
    traced = TracedNetwork(unet)
    with torch.no_grad():
        ref = unet(x, t, context)
        start = time.perf_counter()
        compiled = torch.compile(unet, dynamic=False)
        out = compiled(x, t, context)
        print(f"torch.compile + first call: {time.perf_counter() - start:.1f} s")
        print(f"largest difference from eager: trace {float((traced(x, t, context) - ref).abs().max()):.2e}, "
              f"compiled {float((out - ref).abs().max()):.2e}")
        variants = {"eager": lambda: unet(x, t, context), "trace": lambda: traced(x, t, context),
                    "compile": lambda: compiled(x, t, context)}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for round_ in range(3 + args.calls):
            for name, call in variants.items():
                t0 = time.perf_counter()
                call()
                if round_ >= 3:
                    times[name].append(time.perf_counter() - t0)
    for name, v in times.items():
        print(f"{name:8s} median {1000 * statistics.median(v):.2f} ms over {len(v)} calls, {args.threads} threads")


if __name__ == "__main__":
    main()
