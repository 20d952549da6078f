"""Where the SDXL bench's memory goes above the weights: each U-Net block's and each VAE-decoder
stage's activation peak, counted on the meta device (marble.eval.live_bytes: no arithmetic, no
RAM, seconds even at 1024²).

    python benchmarks/sdxl_memory.py --size 1024 [--weights fp16]

Prints JSON: per block, the peak of live activation bytes above those alive at the block's entry,
and for the whole U-Net call (CFG batch 2) and decode. Kernel scratch and allocator slack are not
in these numbers; `marble bench --arch sdxl` measures RSS, which has them.
"""
from __future__ import annotations

import argparse
import json

import torch

from marble.eval.live_bytes import LiveBytes, label_children
from marble.eval.sdxl_bench import _inputs
from marble.models.conditioning import fourier_features
from marble.models.skeleton import skeleton
from marble.models.stable_diffusion import sdxl_config
from marble.models.unet import UNet
from marble.models.vae import AutoencoderKL
from marble.models.weight_cast import storage_dtype, store_weights


def decoder_stages(d) -> list[tuple[str, torch.nn.Module]]:
    named = [("conv_in", d.conv_in), ("mid.block_1", d.mid.block_1), ("mid.attn_1", d.mid.attn_1),
             ("mid.block_2", d.mid.block_2)]
    for level in reversed(range(len(d.up))):
        stage = d.up[level]
        named += [(f"up.{level}.block.{i}", b) for i, b in enumerate(stage.block)]
        if hasattr(stage, "upsample"):
            named.append((f"up.{level}.upsample", stage.upsample))
    return named + [("norm_out", d.norm_out), ("conv_out", d.conv_out)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--weights", default="fp16")
    a = ap.parse_args()
    config = sdxl_config("sdxl-base")
    storage = storage_dtype(a.weights)
    with skeleton():
        unet, vae = UNet(config.unet), AutoencoderKL(config.vae)
    store_weights(unet, storage)
    store_weights(vae, storage)
    weights = sum(p.numel() * p.element_size() for n in (unet, vae) for p in n.parameters())
    x2, t, context, pooled, time_ids, x = _inputs(config, a.size)
    y = torch.cat([pooled, fourier_features(time_ids, config.vector.fourier_dim)], dim=1)
    x2, t, context, y, x = (v.to("meta") for v in (x2, t, context, y, x))
    mb = lambda n: round(n / 1e6, 1)   # noqa: E731
    report = {"size": a.size, "weights_gb": weights / 1e9}
    blocks = [(f"input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks)] + [("middle_block", unet.middle_block)]
    blocks += [(f"output_blocks.{i}", b) for i, b in enumerate(unet.output_blocks)]
    with torch.inference_mode():
        live = LiveBytes()
        label_children(live, blocks)
        with live:
            unet(x2, t, context, y=y)
        report["unet_peak_mb"] = mb(live.peak)
        report["unet_blocks_mb"] = {k: mb(v) for k, v in live.peaks_by_label.items()}
        live = LiveBytes()
        label_children(live, decoder_stages(vae.decoder))
        with live:
            vae.decode(x)
        report["vae_peak_mb"] = mb(live.peak)
        report["vae_stages_mb"] = {k: mb(v) for k, v in live.peaks_by_label.items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
