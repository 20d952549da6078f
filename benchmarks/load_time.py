"""How long `marble generate` takes to load an SD single file, and where the time goes.

One seeded random-weight fp16 single file of a released architecture (as `sd15_memory.py` writes
it), then fresh processes that each load it as `marble generate` does, alternating the variants
so that the page cache and the machine's drift treat them alike:

- `fp32`: the default, weights cast to float32 on the way in (the reader's staging buffer);
- `fp32-per-tensor`: the same with the reader as it was before session 12 (each cast tensor read
  into a fresh buffer first), to measure what the staging buffer saves;
- `fp16`: `--weights fp16` (no cast);
- `fp16-mapped`: `--weights fp16 --low-memory` (no copy);
each with the model hash cold (an empty hash cache: the file's sha256 is computed) and warm (the
cache of the previous load: no hashing). Prints the median of each and writes --json if given.

    python benchmarks/load_time.py --arch sd15 --runs 3 --json docs/results/load-time.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("fp32", "fp32-per-tensor", "fp16", "fp16-mapped")

CHILD = r"""
import sys, time, torch
variant, path = sys.argv[1], sys.argv[2]
if variant == "fp32-per-tensor":   # the reader before the staging buffer: a fresh buffer per tensor, then the cast
    import marble.tensor_file as tf
    def read_tensors(header, names=None, dtype=None):
        wanted = header.entries if names is None else {k: header.entries[k] for k in names}
        with open(header.path, "rb") as f:
            for name in sorted(wanted, key=lambda k: wanted[k].begin):
                t = tf._read_into(f, wanted[name], header.path, name)
                yield name, t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t
    tf.read_tensors = read_tensors
    import marble.checkpoints.checkpoint as ck
    ck.read_tensors = read_tensors
from marble.checkpoints.resolve import load_model
fp16 = variant.startswith("fp16")
t = time.perf_counter()
load_model(path, torch.float32, storage=torch.float16 if fp16 else None, mapped=variant == "fp16-mapped")
print(time.perf_counter() - t)
"""


def load_seconds(variant: str, path: Path, cache: Path, threads: int) -> float:
    env = dict(os.environ, MARBLE_CACHE_DIR=str(cache), OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", CHILD, variant, str(path)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--runs", type=int, default=3, help="loads per variant and hash state (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here (never overwritten)")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    if args.runs < 1 or not set(variants) <= set(VARIANTS):
        ap.error(f"--runs must be >= 1 and --variants among {', '.join(VARIANTS)}")
    if args.json is not None and args.json.exists():
        ap.error(f"{args.json} exists; not overwritten")

    from marble.cpu_features import cpu_name
    from marble.models.stable_diffusion import sd_config
    from sd15_memory import ARCHS, write_fp16_single_file
    times: dict[str, list[float]] = {f"{v}, hash {h}": [] for v in variants for h in ("cold", "warm")}
    with tempfile.TemporaryDirectory(prefix="marble-load-time-") as folder:
        path = Path(folder) / f"{args.arch}-random-fp16.safetensors"
        t0 = time.perf_counter()
        nbytes = write_fp16_single_file(sd_config(ARCHS[args.arch].preset), path)
        print(f"wrote {nbytes / 1e9:.3f} GB to {path} in {time.perf_counter() - t0:.0f} s")
        for run in range(args.runs):
            for v in variants:
                cache = Path(folder) / f"cache-{v}-{run}"          # empty: the hash is computed
                times[f"{v}, hash cold"].append(load_seconds(v, path, cache, args.threads))
                times[f"{v}, hash warm"].append(load_seconds(v, path, cache, args.threads))   # the same cache, now filled
                print(f"run {run + 1}: {v}: cold {times[f'{v}, hash cold'][-1]:.2f} s, "
                      f"warm {times[f'{v}, hash warm'][-1]:.2f} s", flush=True)
    print(f"\n{args.arch}, fp16 single file {nbytes / 1e9:.3f} GB, {args.threads} threads, {cpu_name()}, "
          f"median of {args.runs}\n\n| load | seconds |\n|---|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} |")
    if args.json is not None:
        from marble.fileio import write_new
        report = {"arch": args.arch, "weights_gb": nbytes / 1e9, "threads": args.threads, "cpu": cpu_name(),
                  "runs": args.runs, "seconds": times, "median_s": {k: statistics.median(v) for k, v in times.items()}}
        write_new(args.json, (json.dumps(report, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
