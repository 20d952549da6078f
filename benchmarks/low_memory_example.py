"""`--low-memory` measured on a small SDXL-shaped model in about a minute on one core: SDXL base's
U-Net layout at a fifth of its width (model_channels 64: ~0.2 GB of fp16 weights), the full SDXL
VAE (0.17 GB), `marble bench --arch sdxl`'s marble side with and without --low-memory.

    python benchmarks/low_memory_example.py [--size 128]

Prints both rows as JSON: each phase's peak RSS, and the bytes released before the decode.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

from marble.config import config_to_dict
from marble.eval.sdxl_bench import SdxlBenchSettings, run_sdxl_bench
from marble.models.stable_diffusion import sdxl_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    config = sdxl_config("sdxl-base")
    config = replace(config, unet=replace(config.unet, model_channels=64))
    rows = {}
    for low in (False, True):
        s = SdxlBenchSettings(size=args.size, config=config_to_dict(config), threads=args.threads, warmup=False,
                              low_memory=low)
        r = run_sdxl_bench(s, log=lambda _: None, diffusers=False).sides["marble"]
        rows["low-memory" if low else "in RAM"] = {
            k: round(getattr(r, k), 3) for k in ("weights_gb", "unet_peak_gb", "decode_peak_gb", "released_gb",
                                                 "unet_step_s", "vae_decode_s")}
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
