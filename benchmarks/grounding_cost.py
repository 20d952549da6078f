"""The training-step cost of token grounding (model.grounding): one batch-32 step (forward,
backward, AdamW) of each config's U-Net, interleaved in one process with the same weights, data
and noise, medians; and, at the grounded config's initial weights, the gradient norm of each term.

    python benchmarks/grounding_cost.py --threads 1 --steps 3 \\
        configs/experiments/builtin-v1.toml configs/experiments/builtin-v2-coords.toml configs/experiments/builtin-v2-grounding.toml

Latents are random (the cost does not depend on them); captions, masks and token positions are
the first images of the shapes world's training split, their context the pretrained MiniLM's.
"""
from __future__ import annotations

from marble.threads import quiet_spin

quiet_spin()   # as the CLI does: libgomp's short spin, read when torch loads

import argparse
import copy
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from marble.diffusion.schedule import make_schedule
from marble.models.text import build_text_encoder
from marble.models.unet import UNet
from marble.train.config import load_config
from marble.train.diffusion import unet_config
from marble.train.grounding import grounding_config, grounding_term, token_offsets
from marble.train.objective import diffusion_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per config (after one warm-up)")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfgs = [load_config(p) for p in args.configs]
    b = args.batch
    text = build_text_encoder(dict(cfgs[0].model["text"])).eval()
    data = copy.deepcopy(cfgs[0].data)
    data.n = b
    masks, tokens, captions = targets(data, text)
    with torch.no_grad():
        context = text.encode(captions)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(b, 4, 16, 16, generator=gen), torch.randn(b, 4, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (b,), generator=gen)
    schedule = make_schedule(name="scaled_linear", n=1000, beta_start=0.00085, beta_end=0.012)

    steps = []
    for path, cfg in zip(args.configs, cfgs):
        torch.manual_seed(0)
        unet = UNet(unet_config(cfg.model["unet"], text.dim)).train()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
        gamma = float(cfg.model.get("min_snr_gamma", 0.0))
        denoise = lambda unet=unet, gamma=gamma: diffusion_loss(unet, schedule, "v", x0, context, t, eps, gamma)  # noqa: E731
        g = grounding_config(cfg.model.get("grounding", {}))
        term = grounding_term(g, unet, masks, tokens) if g.on else None
        loss_of = (lambda term=term, denoise=denoise: term(denoise, torch.arange(b), torch.zeros(b, dtype=torch.bool))[0]) \
            if term else denoise
        if term:
            report_gradients(unet, g, masks, tokens, denoise, b)
        steps.append((path.stem, unet, opt, loss_of))

    # CPU time as well as wall time: beside other jobs the wall time of a step varies 2-3x, the
    # process's own CPU time much less (one thread: the work done)
    wall, cpu = ({name: [] for name, *_ in steps} for _ in range(2))
    for i in range(args.steps + 1):
        for name, unet, opt, loss_of in steps:
            start, start_cpu = time.perf_counter(), time.process_time()
            opt.zero_grad(set_to_none=True)
            loss_of().backward()
            opt.step()
            if i:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    flops = {}
    for name, unet, opt, loss_of in steps:     # exact: what the step computes, noise-free
        with FlopCounterMode(display=False) as counter:
            loss_of().backward()
        flops[name] = counter.get_total_flops()
        unet.zero_grad(set_to_none=True)
    first = steps[0][0]
    print(f"| config | median CPU s / step (batch {b}, {args.threads} thread) | relative to {first} "
          f"| median wall s / step | relative | GFLOP forward + backward | relative |\n|---|---|---|---|---|---|---|")
    for name in wall:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        print(f"| {name} | {c:.2f} | {c / statistics.median(cpu[first]):.3f} | {w:.2f} | {w / statistics.median(wall[first]):.3f} "
              f"| {flops[name] / 1e9:.2f} | {flops[name] / flops[first]:.4f} |")


def targets(data, text):
    """Masks, token positions (as the trainer caches them) and captions of the data's first images."""
    from marble.data.grounding import grounding_targets
    from marble.data.shapes import kind_probabilities, sample_scene
    offsets = token_offsets(text)
    scenes = [sample_scene(data.split, data.seed, i, data.size, kind_probabilities(data.kinds)) for i in range(data.n)]
    out = [grounding_targets(scene, caption, offsets, 16, text.max_tokens) for scene, caption in scenes]
    return (torch.stack([torch.from_numpy(m) for m, _ in out]), torch.stack([torch.from_numpy(k).long() for _, k in out]),
            [caption for _, caption in scenes])


def report_gradients(unet, g, masks, tokens, denoise, b) -> None:
    """Gradient norms over the U-Net of the denoising loss and of each weighted grounding term (a
    term's gradient is that of the loss with only its weight on, less the denoising loss's)."""
    rows, kept = torch.arange(b), torch.zeros(b, dtype=torch.bool)

    def gradient(loss_fn):
        unet.zero_grad(set_to_none=True)
        loss_fn().backward()
        return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in unet.parameters()])

    plain = gradient(denoise)
    only = {name: replace(g, token_weight=g.token_weight if name == "token" else 0.0,
                          pixel_weight=g.pixel_weight if name == "pixel" else 0.0) for name in ("token", "pixel")}
    norms = {name: (gradient(lambda c=c: grounding_term(c, unet, masks, tokens)(denoise, rows, kept)[0]) - plain).norm().item()
             for name, c in only.items()}
    _, metrics = grounding_term(g, unet, masks, tokens)(denoise, rows, kept)
    unet.zero_grad(set_to_none=True)
    print(f"at init: {', '.join(f'{k} {v:.4f}' for k, v in metrics.items())}; gradient norms: denoise "
          f"{plain.norm().item():.3g}, {g.token_weight:g} x token {norms['token']:.3g}, "
          f"{g.pixel_weight:g} x pixel {norms['pixel']:.3g}")


if __name__ == "__main__":
    main()
