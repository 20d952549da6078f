"""What one ControlNet adds to an SD1.5 U-Net step: the U-Net alone against the ControlNet then the
U-Net with its residuals, side by side in one run (the issue's bar: at most +45%).

Random weights (speed does not depend on them). Each variant runs `--repeats` times after one
warm-up call, interleaved (base, controlled, base, ...) so a busy machine slows both alike; the
median is reported. `--flops` counts the floating-point operations of one step instead (torch's
FlopCounterMode on the meta device: exact, instant, blind to a busy machine).

    python benchmarks/controlnet_speed.py [--side 512] [--batch 2] [--repeats 3]
    python benchmarks/controlnet_speed.py --flops [--side 512]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from marble.models.controlnet import ControlNet, controlnet_config
from marble.models.unet import UNET_PRESETS, UNet


def networks(device: str):
    config = UNET_PRESETS["sd15"]
    with torch.device(device):
        unet, net = UNet(config), ControlNet(controlnet_config(config, 8))
    if device != "meta":
        g = torch.Generator().manual_seed(0)
        for module in (unet, net):
            for p in module.parameters():
                p.data.normal_(0, 0.02, generator=g)
    return unet.eval(), net.eval()


def inputs(device: str, side: int, batch: int):
    with torch.device(device):
        return (torch.randn(batch, 4, side // 8, side // 8), torch.full((batch,), 500.0),
                torch.randn(batch, 77, 768), torch.rand(batch, 3, side, side))


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2, help="2: a CFG step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flops", action="store_true")
    args = ap.parse_args()
    device = "meta" if args.flops else "cpu"
    unet, net = networks(device)
    x, t, context, hint = inputs(device, args.side, args.batch)
    base = lambda: unet(x, t, context)                                          # noqa: E731
    controlled = lambda: unet(x, t, context, control=net(x, t, context, hint))  # noqa: E731
    if args.flops:
        counts = []
        for fn in (base, controlled):
            with FlopCounterMode(display=False) as counter:
                fn()
            counts.append(counter.get_total_flops())
        print(f"{args.side}², batch {args.batch}: U-Net {counts[0] / 1e12:.3f} TFLOP, with one ControlNet "
              f"{counts[1] / 1e12:.3f} TFLOP: +{100 * (counts[1] / counts[0] - 1):.1f}%")
        return
    times: dict[str, list[float]] = {"base": [], "controlled": []}
    base(), controlled()   # warm-up
    for _ in range(args.repeats):
        for name, fn in (("base", base), ("controlled", controlled)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    b, c = statistics.median(times["base"]), statistics.median(times["controlled"])
    print(f"{args.side}², batch {args.batch}, {torch.get_num_threads()} threads: U-Net {b:.2f} s, "
          f"with one ControlNet {c:.2f} s: +{100 * (c / b - 1):.1f}% (medians of {args.repeats})")


if __name__ == "__main__":
    main()
