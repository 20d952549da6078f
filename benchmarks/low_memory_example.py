"""`--low-memory` measured on a small SDXL-shaped model in about a minute on one core: SDXL base's
U-Net layout at a fifth of its width (model_channels 64: ~0.2 GB of fp16 weights), the full SDXL
VAE (0.17 GB), `marble bench --arch sdxl`'s marble side with and without --low-memory.

    python benchmarks/low_memory_example.py [--size 128]

Prints both rows as JSON: each phase's peak RSS, and the bytes released before the decode; then
what re-faulting released pages costs (0.54 GB of fp16 tensors, released and read again).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from marble.config import config_to_dict
from marble.eval.sdxl_bench import SdxlBenchSettings, run_sdxl_bench
from marble.models.stable_diffusion import sdxl_config
from marble.tensor_file import map_tensors, read_header, release, safetensors_writer


def refault_seconds(tensors: list[torch.Tensor]) -> float:
    """Seconds to read one value from every 4 KiB page of `tensors` (fp16)."""
    t0 = time.perf_counter()
    for t in tensors:
        t.view(-1)[::2048].sum()
    return time.perf_counter() - t0


def refault_cost() -> dict:
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w.safetensors"
        with open(path, "wb") as f:
            safetensors_writer({f"w{i}": torch.randn(2048, 8192, generator=g).half() for i in range(16)})(f)
        tensors = [t for _, t in map_tensors(read_header(path))]
        refault_seconds(tensors)
        resident = refault_seconds(tensors)
        released = release(tensors)
        return {"gb": round(released / 1e9, 3), "resident_s": round(resident, 4),
                "refault_s": round(refault_seconds(tensors), 4)}


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
    rows["re-fault"] = refault_cost()
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
