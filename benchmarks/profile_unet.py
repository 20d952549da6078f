"""Where an SD1.5 U-Net step and a VAE decode spend their time on this CPU (issue 18, item 1).

Random weights in SD1.5's shapes (nothing downloaded). For each network: torch.profiler's self
time of every operator, summed into categories (convolutions, matrix products, attention,
GroupNorm, LayerNorm, elementwise, copies and layout changes, other), the FLOPs of one call from
torch's flop counter, and the achieved GFLOP/s of the convolutions and matrix products against the
rates this machine's torch kernels reach on their own: a large fp32 matrix product and a
320-channel 3×3 convolution, measured in the same run.

    python benchmarks/profile_unet.py --size 256 --threads 2          # a few minutes
    python benchmarks/profile_unet.py --size 512 --threads 2          # SD1.5's own size: a quiet quarter hour
    python benchmarks/profile_unet.py --size 512 --threads 2 --channels-last-ab --calls 3   # NCHW vs channels-last

Only ratios measured in one run mean anything on a shared machine.
"""
from __future__ import annotations

from marble.threads import quiet_spin

quiet_spin()   # as the CLI does: libgomp's short spin, read when torch loads

import argparse
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from marble.cpu_features import cpu_flags, cpu_name
from marble.models.skeleton import skeleton
from marble.models.unet import UNET_PRESETS, UNet
from marble.models.vae import VAE_PRESETS, AutoencoderKL

# operator name (without "aten::") -> category; anything else is "other"
CATEGORIES = {
    "convolution": ("mkldnn_convolution", "_slow_conv2d_forward", "thnn_conv2d", "convolution", "_convolution",
                    "conv2d", "_nnpack_spatial_convolution"),
    "matmul": ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear"),
    "attention": ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_attention_math", "softmax", "_softmax"),
    "GroupNorm": ("group_norm", "native_group_norm"),
    "LayerNorm": ("layer_norm", "native_layer_norm"),
    "elementwise": ("add", "add_", "mul", "mul_", "div", "sub", "silu", "silu_", "gelu", "exp", "cos", "sin",
                    "lerp", "rsqrt", "pow", "neg", "clamp", "upsample_nearest2d"),
    "copies/layout": ("copy_", "clone", "contiguous", "cat", "to", "_to_copy", "empty", "empty_like",
                      "empty_strided", "reshape", "view", "permute", "transpose", "t", "expand", "as_strided",
                      "_reshape_alias", "split", "chunk", "slice", "select", "unsqueeze", "squeeze",
                      "narrow", "detach", "resize_"),
}
CATEGORY_OF = {name: cat for cat, names in CATEGORIES.items() for name in names}
FLOP_CATEGORY = {"convolution": "convolution", "mm": "matmul", "addmm": "matmul", "bmm": "matmul",
                 "baddbmm": "matmul", "_scaled_dot_product_flash_attention_for_cpu": "attention",
                 "scaled_dot_product_attention": "attention"}


def random_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Fill a skeleton with N(0, 0.02) weights, unit norms: values do not matter for time (no denormals)."""
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return module.eval()


def timed(fn, calls: int) -> float:
    fn()   # warm-up: kernels picked, memory allocated
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_rates(calls: int = 3) -> dict[str, float]:
    """GFLOP/s of torch's own kernels here: an fp32 GEMM and SD's 320-channel 3×3 convolution."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gemm = 2 * 2048**3 / timed(lambda: a @ b, calls) / 1e9
    x, w = torch.randn(2, 320, 64, 64), torch.randn(320, 320, 3, 3) * 0.02
    conv = 2 * 2 * 320 * 320 * 9 * 64 * 64 / timed(lambda: F.conv2d(x, w, padding=1), calls) / 1e9
    return {"gemm": gemm, "conv3x3": conv}


def _sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """Q·Kᵀ and P·V of (B, H, L, E) queries over S keys; torch's counter has no CPU formula for it."""
    b, h, length, e = q
    return 2 * b * h * length * k[-2] * e + 2 * b * h * length * k[-2] * v[-1]


def flops_by_category(fn) -> tuple[float, dict[str, float]]:
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops})
    with counter:
        fn()
    per: dict[str, float] = defaultdict(float)
    for op, n in counter.get_flop_counts()["Global"].items():
        name = str(op).split(".")[1] if str(op).startswith("aten.") else str(op)   # aten.addmm -> addmm
        per[FLOP_CATEGORY.get(name, "other")] += n
    return counter.get_total_flops(), dict(per)


def profile_table(name: str, fn, calls: int, rates: dict[str, float]) -> str:
    seconds = timed(fn, calls)
    total_flops, flops = flops_by_category(fn)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    self_us: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        op = event.key.removeprefix("aten::")
        self_us[CATEGORY_OF.get(op, "other")] += event.self_cpu_time_total
    profiled = sum(self_us.values())
    lines = [f"### {name}: {seconds:.3f} s a call (median of {calls}), {total_flops / 1e12:.3f} TFLOP, "
             f"{total_flops / seconds / 1e9:.0f} GFLOP/s = {total_flops / seconds / 1e9 / rates['gemm']:.0%} "
             f"of the fp32 GEMM rate", "",
             "| operators | share of time | seconds (scaled to the median call) | GFLOP | GFLOP/s | of GEMM rate |",
             "|---|---|---|---|---|---|"]
    for cat in sorted(self_us, key=self_us.get, reverse=True):
        share = self_us[cat] / profiled
        s = share * seconds
        gflop = flops.get(cat, 0.0) / 1e9
        rate = f"{gflop / s:.0f}" if gflop else ""
        of_peak = f"{gflop / s / rates['gemm']:.0%}" if gflop else ""
        lines.append(f"| {cat} | {share:.1%} | {s:.3f} | {gflop:.1f} | {rate} | {of_peak} |")
    return "\n".join(lines)


@torch.inference_mode()
def channels_last_ab(latent: int, calls: int) -> None:
    """The SD1.5 U-Net step (CFG batch 2) with weights and input in NCHW, then in channels-last
    (oneDNN's native layout: no reorder around each convolution), calls alternated."""
    import copy
    with skeleton():
        unet = UNet(UNET_PRESETS["sd15"])
    unet = random_weights(unet)
    nhwc = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    x, t, ctx = torch.randn(2, 4, latent, latent), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    xc = x.to(memory_format=torch.channels_last)
    ref = unet(x, t, ctx)
    print(f"channels-last against NCHW: largest difference / largest value "
          f"{((nhwc(xc, t, ctx) - ref).abs().max() / ref.abs().max()).item():.1e}")
    times: dict[str, list[float]] = {"NCHW": [], "channels-last": []}
    for _ in range(calls):
        for name, run in (("NCHW", lambda: unet(x, t, ctx)), ("channels-last", lambda: nhwc(xc, t, ctx))):
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    a, b = (statistics.median(v) for v in times.values())
    print(f"U-Net step, {latent * 8}²: NCHW {a:.3f} s, channels-last {b:.3f} s ({b / a:.2f}×), medians of {calls}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--calls", type=int, default=2, help="timed calls per network (median)")
    parser.add_argument("--only", choices=("unet", "vae"), default=None)
    parser.add_argument("--channels-last-ab", action="store_true",
                        help="instead of the profile: the U-Net step in NCHW and in channels-last, calls alternated")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
    print(f"CPU: {cpu_name()} ({' '.join(flags)}), {torch.get_num_threads()} threads, torch {torch.__version__}")
    rates = kernel_rates()
    print(f"fp32 GEMM 2048³: {rates['gemm']:.0f} GFLOP/s; 3×3 conv 320→320 at 64×64, batch 2: "
          f"{rates['conv3x3']:.0f} GFLOP/s\n")
    latent = args.size // 8
    if args.channels_last_ab:
        return channels_last_ab(latent, args.calls)
    with torch.inference_mode():
        if args.only in (None, "unet"):
            with skeleton():
                unet = UNet(UNET_PRESETS["sd15"])
            unet = random_weights(unet)
            x, t, ctx = torch.randn(2, 4, latent, latent), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
            print(profile_table(f"SD1.5 U-Net step, CFG batch 2, {args.size}² ({latent}² latent)",
                                lambda: unet(x, t, ctx), args.calls, rates) + "\n")
            del unet
        if args.only in (None, "vae"):
            with skeleton():
                vae = AutoencoderKL(VAE_PRESETS["sd"])
            vae = random_weights(vae)
            z = torch.randn(1, 4, latent, latent)
            print(profile_table(f"SD VAE decode to {args.size}²", lambda: vae.decode(z), args.calls, rates))


if __name__ == "__main__":
    main()
