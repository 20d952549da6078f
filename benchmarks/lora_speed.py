"""What a LoRA costs per U-Net step on SD1.5's shapes: base, unfused (overlay hooks) and fused,
side by side in one run, and how long reading the LoRA file takes.

The U-Net has random weights (speed does not depend on them); the LoRA is a random kohya file of
`--rank` on every attention layer and, with `--locon`, every ResNet/down/upsample layer too (the
usual shared LoRA is attention only, rank 8-128). Each variant runs `--repeats` times after one
warm-up call, interleaved (base, unfused, fused, base, ...) so a busy machine slows all three alike;
the median is reported.

    python benchmarks/lora_speed.py [--side 512] [--batch 2] [--rank 32] [--locon] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from marble.adapters.lora import LoraUse, fuse, overlay
from marble.adapters.lora_files import Lora, LoraLayer, read_lora, save_kohya
from marble.adapters.lora_table import module_table
from marble.checkpoints.resolve import random_model
from marble.models.stable_diffusion import sd_config


def random_lora(table, kinds, rank: int, seed: int = 0) -> Lora:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for t in table.select(kinds):
        w = t.module.weight
        down = torch.randn((rank, *w.shape[1:]) if w.ndim == 4 else (rank, w.shape[1]), generator=g) * 0.01
        up = torch.randn((w.shape[0], rank, 1, 1) if w.ndim == 4 else (w.shape[0], rank), generator=g) * 0.01
        layers[t.name] = LoraLayer(down.half(), up.half(), rank / 2)
    return Lora("bench", layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, default=512, help="image side in pixels (latent side / 8)")
    ap.add_argument("--batch", type=int, default=2, help="2 = one CFG step")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--locon", action="store_true", help="also patch the ResNet and down/upsample layers")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = random_model(lambda: sd_config("sd15"), seed=0)
    table = module_table(model)
    kinds = ["attention", "text"] + (["conv"] if args.locon else [])
    with tempfile.TemporaryDirectory() as folder:
        path = save_kohya(Path(folder) / "bench.safetensors", random_lora(table, kinds, args.rank), table,
                          dtype=torch.float16)
        size = path.stat().st_size
        start = time.perf_counter()
        lora = read_lora(path, table)
        read_s = time.perf_counter() - start
    uses = [LoraUse(lora)]
    g = torch.Generator().manual_seed(1)
    side = args.side // 8
    x = torch.randn(args.batch, 4, side, side, generator=g)
    t = torch.full((args.batch,), 500.0)
    context = torch.randn(args.batch, 77, 768, generator=g)

    @torch.inference_mode()
    def step() -> float:
        begin = time.perf_counter()
        model.unet(x, t, context)
        return time.perf_counter() - begin

    def unfused() -> float:
        with overlay(model, uses, table):
            return step()

    # fused: swap the patched weights in and out (copies of those only, to keep memory modest)
    patched = [table.targets[name].module.weight for name in lora.layers]
    base_weights = [w.clone() for w in patched]
    fuse(model, uses, table)
    fused_weights = [w.clone() for w in patched]

    def load(weights) -> None:
        with torch.no_grad():
            for w, v in zip(patched, weights):
                w.copy_(v)

    load(base_weights)
    times = {"base": [], "unfused": [], "fused": []}
    for i in range(args.repeats + 1):
        base = step()
        lora_step = unfused()
        load(fused_weights)
        fused = step()
        load(base_weights)
        if i:   # the first round is the warm-up
            times["base"].append(base)
            times["unfused"].append(lora_step)
            times["fused"].append(fused)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SD1.5 U-Net, batch {args.batch}, {args.side}² ({side}² latent), LoRA rank {args.rank} on "
          f"{len(lora.layers)} layers ({'+'.join(kinds)}), {size / 1e6:.0f} MB fp16, read in {read_s:.2f} s")
    for k in ("base", "unfused", "fused"):
        print(f"  {k:8s} {med[k]:7.2f} s/step  ({med[k] / med['base']:.3f}× base)  runs: "
              + " ".join(f"{s:.2f}" for s in times[k]))


if __name__ == "__main__":
    main()
