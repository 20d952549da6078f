"""What a traced built-in image spends outside its U-Net calls, and three candidates to cut it, each
timed side by side in one process (docs/bench.md, "What a traced image still spends outside the
networks"). The same call varies by a third between fresh processes on these machines, so only the
ratios inside one run are read.

    python benchmarks/trace_overheads.py --part components      # per component inside generate
    python benchmarks/trace_overheads.py --part check           # the trace's staleness check: walk vs slots
    python benchmarks/trace_overheads.py --part codecs          # text encoder and VAE decode, eager vs traced
    python benchmarks/trace_overheads.py --part channels-last   # the traced batch-1 U-Net, NCHW vs channels-last
    python benchmarks/trace_overheads.py --part freeze          # whole images, the trace frozen or not (not adopted)
"""
from __future__ import annotations

from marble.threads import quiet_spin

quiet_spin()   # as the CLI does

import argparse
import statistics
import time
import warnings
from collections import defaultdict

import torch

import marble.models.traced as traced
from marble.cpu_features import cpu_name
from marble.pipeline import load_pipeline
from marble.request import GenerationRequest, resolve

PROMPT = "two red circles above a blue square"


def medians(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each callable, the callables alternated round by round after a warm-up."""
    for f in fns.values():
        for _ in range(3):
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def components(model: str, rounds: int) -> None:
    pipe = load_pipeline(model, trace=True)
    m = pipe.model
    req = resolve(GenerationRequest(prompt=PROMPT, seed=0), pipe.defaults)
    spent: dict[str, float] = defaultdict(float)

    def timed(fn, label):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[label] += time.perf_counter() - t0
            return out
        return call
    m.text_encoder.forward = timed(m.text_encoder.forward, "text encoder")
    m.vae.decode = timed(m.vae.decode, "VAE decode")
    traced.TracedNetwork.__call__ = timed(traced.TracedNetwork.__call__, "U-Net calls (traced)")
    for _ in range(3):
        pipe.generate(req)
    spent.clear()
    t0 = time.perf_counter()
    for _ in range(rounds):
        pipe.generate(req)
    total = time.perf_counter() - t0
    for k, v in spent.items():
        print(f"{k}: {v / rounds * 1e3:.1f} ms an image")
    print(f"the rest: {(total - sum(spent.values())) / rounds * 1e3:.1f} ms an image (of {total / rounds * 1e3:.1f})")


def check(model: str, rounds: int) -> None:
    pipe = load_pipeline(model, trace=True)
    req = resolve(GenerationRequest(prompt=PROMPT, seed=0), pipe.defaults)
    slots = traced.TracedNetwork._weights

    def walk(self):   # the check before: walk parameters(); then the slots, so both arms reuse one trace
        tuple(id(p) for p in self.network.parameters())
        return slots(self)

    def image(check_fn):
        def run():
            traced.TracedNetwork._weights = check_fn
            pipe.generate(req)
        return run
    t = medians({"walk parameters() (before)": image(walk), "parameter slots (now)": image(slots)}, rounds)
    for k, v in t.items():
        print(f"{model}, {k}: {v * 1e3:.1f} ms an image")
    before, now = t.values()
    print(f"ratio {now / before:.3f} (the before arm also ran the slots: it overstates by their cost)")


def codecs(model: str, rounds: int) -> None:
    m = load_pipeline(model).model
    enc, vae = m.text_encoder.eval(), m.vae.eval()
    tokens = enc.tokenize([PROMPT])
    z = torch.randn(1, m.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = torch.jit.trace(enc, (tokens,), check_trace=False)
        decode = torch.jit.trace_module(vae, {"decode": (z,)}, check_trace=False)
        print("bit-identical:", torch.equal(text(tokens), enc(tokens)), torch.equal(decode.decode(z), vae.decode(z)))
        t = medians({"text encoder, eager": lambda: enc(tokens), "text encoder, traced": lambda: text(tokens),
                     "VAE decode, eager": lambda: vae.decode(z), "VAE decode, traced": lambda: decode.decode(z)}, rounds)
    for k, v in t.items():
        print(f"{k}: {v * 1e3:.2f} ms")


def channels_last(model: str, rounds: int) -> None:
    import copy
    unet = load_pipeline(model).model.unet.eval()
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(1, 4, 16, 16, generator=g), torch.full((1,), 500.0), torch.randn(1, 32, 384, generator=g)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nchw = torch.jit.trace(unet, (x, t, c), check_trace=False)
        cl = copy.deepcopy(unet).to(memory_format=torch.channels_last)
        xc = x.to(memory_format=torch.channels_last)
        nhwc = torch.jit.trace(cl, (xc, t, c), check_trace=False)
        print(f"largest difference: {(nhwc(xc, t, c) - nchw(x, t, c)).abs().max().item():.2e}")
        times = medians({"traced, NCHW": lambda: nchw(x, t, c), "traced, channels-last": lambda: nhwc(xc, t, c)}, rounds)
    for k, v in times.items():
        print(f"{k}: {v * 1e3:.2f} ms a batch-1 call")


def freeze(model: str, rounds: int) -> None:
    """Whole images through TracedNetwork as it is, against the same with each trace frozen
    (torch.jit.freeze: weights folded in as constants). Freezing was measured and not adopted: a
    frozen graph may hold copies of weights that a fused LoRA later changes in place."""
    import numpy as np
    plain, frozen = load_pipeline(model, trace=True), load_pipeline(model, trace=True)
    req = resolve(GenerationRequest(prompt=PROMPT, seed=0), plain.defaults)
    a = np.asarray(plain.generate(req).images[0])
    trace = torch.jit.trace
    torch.jit.trace = lambda *args, **kwargs: torch.jit.freeze(trace(*args, **kwargs))   # the second pipeline's
    try:                                                                                  # traces, cached after
        b = np.asarray(frozen.generate(req).images[0])
    finally:
        torch.jit.trace = trace
    print("bit-identical images:", np.array_equal(a, b))
    t = medians({"trace (as shipped)": lambda: plain.generate(req),
                 "frozen trace": lambda: frozen.generate(req)}, rounds)
    for k, v in t.items():
        print(f"{model}, {k}: {v * 1e3:.1f} ms an image")
    before, now = t.values()
    print(f"ratio {now / before:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("components", "check", "codecs", "channels-last", "freeze"), required=True)
    parser.add_argument("--model", default="builtin-lcm")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, {args.model}")
    {"components": components, "check": check, "codecs": codecs, "channels-last": channels_last,
     "freeze": freeze}[args.part](
        args.model, args.rounds)


if __name__ == "__main__":
    main()
