"""Peak memory of SD1.5 generating from an fp16 single file, marble alone (issue 18, item 6).

    python benchmarks/sd15_memory.py [--size 512] [--steps 2] [--json sd15-memory.json]

Writes SD1.5's architecture with seeded random weights (each tensor drawn in float32, the scheme
of marble.eval.sd_bench.draw_weight, stored in fp16) to a temporary SD/LDM single file, as users
have them: original key names, no marble config in it (the architecture is recognised from the
shapes). Then each row is a fresh `python benchmarks/sd15_memory.py --child` (so its RSS is its
own, nothing else's) that does what `marble generate --weights fp16 [--low-memory]` does: load
the file (load_pipeline, storage fp16, compute fp32) and generate one image (Euler, CFG 7.5).
Rows: the weights in RAM, and `--low-memory` (the fp16 tensors stay views of the file's memory
map; each network's pages are released when its stage ends).

Per phase, the process's peak RSS (VmHWM, reset at each phase's start: /proc/self/clear_refs), in
GB (10⁹ bytes, the unit of the weights): load (from the process's start: Python and torch
included), text encoding (until the first U-Net call), U-Net steps (until the decode), VAE
decode (the decode and the conversion to an image). The peak does not grow with the step count:
every step frees its activations before the next, and the sampler keeps a few latents (KBs), so 2
steps measure what 20 or 50 would (tests/test_sd15_memory.py compares 1 step with 2).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset"
NEGATIVE = "blurry, low quality"
PHASES = ("load", "text encoding", "U-Net steps", "VAE decode")
ROWS = {"in RAM": False, "--low-memory": True}
TARGET_GB = 3.5   # issue 18: peak RSS for SD1.5 with fp16 weights on disk


def status_bytes(field: str) -> int:
    """A /proc/self/status size field (VmHWM: peak RSS since the last reset; VmRSS: now), in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    """VmHWM back to the current RSS (Linux: "5" > /proc/self/clear_refs), to measure one phase."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PhaseClock:
    """Phases closed one after another, each with its seconds and its peak RSS (VmHWM, reset at the
    phase's start); the first phase runs from the clock's creation."""

    def __init__(self):
        self.phases: list[dict] = []
        self.start = time.perf_counter()

    def close(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases.append({"phase": phase, "peak_gb": status_bytes("VmHWM") / 1e9,
                            "end_rss_gb": status_bytes("VmRSS") / 1e9, "seconds": now - self.start})
        self.start = now
        reset_peak()


# --- the file -------------------------------------------------------------------------------------

@torch.no_grad()
def write_fp16_single_file(config, path: Path, seed: int = 0, with_config: bool = False) -> int:
    """`config`'s architecture with seeded random weights, written to `path` as an SD single file in
    fp16; returns the weights' bytes. Drawn tensor by tensor (never the model in float32: SD1.5's
    is 4.3 GB). `with_config`: also store the marble config in the metadata (needed for an
    architecture that is not a released one, which a single file cannot declare otherwise)."""
    from marble.checkpoints.checkpoint import Checkpoint
    from marble.checkpoints.sd_single_file import single_file_state
    from marble.config import config_to_json
    from marble.eval.sd_bench import draw_weight
    from marble.fileio import write_new
    from marble.models.latent_diffusion import LatentDiffusion
    from marble.models.skeleton import skeleton
    from marble.tensor_file import safetensors_writer
    with skeleton():
        model = LatentDiffusion(config)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            t = draw_weight(module, name, torch.empty(p.shape), g)
            state[f"{prefix}.{name}" if prefix else name] = t.to(torch.float16)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise RuntimeError(f"state entries without a drawn value: {sorted(missing)[:5]}")
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    sd_state = single_file_state(Checkpoint(config, state, path, "", "marble"))
    del state
    metadata = {"format": "pt"}
    if with_config:
        metadata["marble_config"] = config_to_json(config)
    write_new(path, safetensors_writer(sd_state, metadata))
    return nbytes


# --- one row, in its own process --------------------------------------------------------------------

def generate_measured(path: Path, size: int, steps: int, cfg: float, low_memory: bool, seed: int = 0,
                      storage: torch.dtype | None = torch.float16, quantize: str | None = None) -> dict:
    """In this (fresh) process: load `path` as `marble generate --weights fp16 [--low-memory]` does
    and generate one image, closing a phase at the first U-Net call, at the decode and at the end.
    `storage`, `quantize`: load_pipeline's (None, None: `marble generate` without --weights)."""
    from marble.pipeline import load_pipeline
    from marble.request import GenerationRequest, resolve
    from marble.tensor_file import mapped_bytes

    after_imports = status_bytes("VmRSS")
    clock = PhaseClock()
    phases, close = clock.phases, clock.close

    pipe = load_pipeline(str(path), storage=storage, quantize=quantize, mapped=low_memory)
    model = pipe.model
    mapped = mapped_bytes(model.parameters())
    close("load")

    def first_unet_call(module, args):
        if len(phases) == 1:
            close("text encoding")
    model.unet.register_forward_pre_hook(first_unet_call)
    decode = model.vae.decode

    def decode_closing(*args, **kwargs):
        close("U-Net steps")
        return decode(*args, **kwargs)
    model.vae.decode = decode_closing   # an instance attribute: the pipeline's `vae.decode(x)` finds it first
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=seed, steps=steps, sampler="Euler",
                                cfg=cfg, width=size, height=size)
    image = pipe.generate(resolve(request, pipe.defaults)).images[0]
    close("VAE decode")
    if [p["phase"] for p in phases] != list(PHASES):
        raise RuntimeError(f"phases closed out of order: {[p['phase'] for p in phases]}")
    pixels = np.asarray(image)
    return {"low_memory": low_memory, "after_imports_gb": after_imports / 1e9, "mapped_gb": mapped / 1e9,
            "phases": phases, "peak_gb": max(p["peak_gb"] for p in phases), "threads": torch.get_num_threads(),
            "image_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(), "image_shape": list(pixels.shape)}


def run_child(path: Path, size: int, steps: int, cfg: float, low_memory: bool, threads: int | None) -> dict:
    """generate_measured in a fresh interpreter (this one, this PYTHONPATH): its RSS is that run's alone."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--size", str(size),
           "--steps", str(steps), "--cfg", str(cfg)] + (["--low-memory"] if low_memory else []) + \
          (["--threads", str(threads)] if threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"the measured run failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the report -----------------------------------------------------------------------------------

def measure(size: int = 512, steps: int = 2, cfg: float = 7.5, threads: int | None = None, config=None,
            rows: dict[str, bool] = ROWS, log=print) -> dict:
    """Write the file once (None: SD1.5), then one fresh process per row; the report as a dict."""
    from marble.eval.sdxl_bench import cpu_model, malloc_trim
    from marble.models.stable_diffusion import sd_config
    with tempfile.TemporaryDirectory(prefix="marble-sd15-memory-") as folder:
        path = Path(folder) / "sd15-random-fp16.safetensors"
        t0 = time.perf_counter()
        nbytes = write_fp16_single_file(config or sd_config("sd15"), path, with_config=config is not None)
        malloc_trim()   # this parent keeps nothing while the rows run
        log(f"wrote {nbytes / 1e9:.3f} GB of fp16 weights to {path} in {time.perf_counter() - t0:.0f} s")
        report = {"settings": {"model": "sd15" if config is None else getattr(config, "name", "custom"),
                               "size": size, "steps": steps, "sampler": "Euler", "cfg": cfg, "weights": "fp16",
                               "threads": threads},
                  "cpu": cpu_model(), "weights_gb": nbytes / 1e9, "file_gb": path.stat().st_size / 1e9,
                  "target_gb": TARGET_GB, "rows": {}}
        for label, low_memory in rows.items():
            log(f"{label}: loading and generating in a fresh process ...")
            row = run_child(path, size, steps, cfg, low_memory, threads)
            report["rows"][label] = row
            log("  " + ", ".join(f"{p['phase']} {p['peak_gb']:.3f} GB" for p in row["phases"]))
    shas = {r["image_sha256"] for r in report["rows"].values()}
    report["same_image"] = len(shas) == 1
    return report


def markdown(report: dict) -> str:
    s, rows = report["settings"], report["rows"]
    labels = list(rows)
    head = (f"{s['model']}, random weights in an fp16 single file ({report['weights_gb']:.3f} GB of weights), "
            f"{s['size']}×{s['size']}, Euler {s['steps']} steps, CFG {s['cfg']:g}, "
            f"{next(iter(rows.values()))['threads']} threads{', ' + report['cpu'] if report['cpu'] else ''}")
    lines = [head, "", "| peak RSS (GB, 10⁹ B) | " + " | ".join(f"fp16 weights, {k}" for k in labels) + " |",
             "|---" * (len(labels) + 1) + "|"]
    for i, phase in enumerate(PHASES):
        lines.append(f"| {phase} | " + " | ".join(f"{rows[k]['phases'][i]['peak_gb']:.3f}" for k in labels) + " |")
    lines.append("| **whole run** | " + " | ".join(f"**{rows[k]['peak_gb']:.3f}**" for k in labels) + " |")
    lines.append("| RSS after imports | " + " | ".join(f"{rows[k]['after_imports_gb']:.3f}" for k in labels) + " |")
    lines.append("| weights mapped from the file | " + " | ".join(f"{rows[k]['mapped_gb']:.3f}" for k in labels) + " |")
    if s["model"] == "sd15" and s["size"] == 512:   # the target is for SD1.5 at its own size
        lines.append("| target | " + " | ".join(f"≤ {report['target_gb']:g}: "
                                               f"{'met' if rows[k]['peak_gb'] <= report['target_gb'] else 'not met'}"
                                               for k in labels) + " |")
    lines += ["", "Seconds per phase: " + "; ".join(
        f"{k}: " + ", ".join(f"{p['phase']} {p['seconds']:.1f}" for p in rows[k]["phases"]) for k in labels)]
    if len(labels) > 1:
        lines.append(f"Images bit for bit equal across rows: {'yes' if report['same_image'] else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (a multiple of 8)")
    ap.add_argument("--steps", type=int, default=2, help="Euler steps (the peak does not depend on them)")
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--config", type=Path, default=None,
                    help="another architecture (a LatentDiffusionConfig as JSON), e.g. a reduced SD1.5")
    ap.add_argument("--only", choices=list(ROWS), default=None, help="one row only")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here (never overwritten)")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--low-memory", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.size <= 0 or a.size % 8 or a.steps < 1:
        raise SystemExit("--size must be a positive multiple of 8 and --steps >= 1")
    if a.child is not None:
        if a.threads:
            torch.set_num_threads(a.threads)
        print(json.dumps(generate_measured(a.child, a.size, a.steps, a.cfg, a.low_memory)))
        return
    if a.json is not None and a.json.exists():
        raise SystemExit(f"{a.json} exists; nothing is overwritten")
    config = None
    if a.config is not None:
        from marble.config import config_from_dict
        from marble.models.latent_diffusion import LatentDiffusionConfig
        config = config_from_dict(LatentDiffusionConfig, json.loads(a.config.read_text()))
    rows = ROWS if a.only is None else {a.only: ROWS[a.only]}
    report = measure(a.size, a.steps, a.cfg, a.threads, config, rows, log=lambda m: print(m, file=sys.stderr))
    print(markdown(report))
    if a.json is not None:
        from marble.fileio import write_new
        write_new(a.json, json.dumps(report, indent=2).encode("utf-8"))


if __name__ == "__main__":
    main()
