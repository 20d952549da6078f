"""Peak memory of SD1.5 or SDXL base generating from an fp16 single file, marble alone (issue 18
item 6; issue 17 item 8).

SDXL base at 1024², the lead's run (on a quiet CPU: about 12 minutes on the 2-core EPYC, 11 to 15,
estimated below; $TMPDIR needs 7 GB free, and the in-RAM row about 12 GB of RAM):

    cd /work/main && flock /work/wt/cpu.lock .venv/bin/python benchmarks/sd15_memory.py --arch sdxl --json docs/results/sdxl-memory.json

    python benchmarks/sd15_memory.py [--arch sd15|sdxl] [--size N] [--steps 2] [--cfg C]
                                     [--width-divisor N] [--only ROW] [--vae-tiling] [--json report.json]

Writes the architecture (`--arch sd15`, the default: SD1.5 at 512², CFG 7.5; `--arch sdxl`: SDXL
base at 1024², CFG 5) with seeded random weights (each tensor drawn in float32, the scheme of
marble.eval.sd_bench.draw_weight, stored in fp16) to a temporary single file as users have them:
original LDM / sgm key names (`model.diffusion_model.`, `conditioner.embedders.0.transformer.`,
`conditioner.embedders.1.model.` with its fused in_proj and transposed text_projection), no
marble config in it (the architecture is recognised from the shapes). The file is streamed, one
tensor drawn and written at a time (SDXL's is 6.9 GB). Then each row is a fresh `python
benchmarks/sd15_memory.py --child` (so its RSS is its own, nothing else's) that does what
`marble generate FILE --weights fp16 [--low-memory]` does: load the file (load_pipeline, storage
fp16, compute fp32) and generate one image (Euler, a prompt and a negative prompt). Rows: the
weights in RAM, and `--low-memory` (the fp16 tensors stay views of the file's memory map; each
network's pages are released when its stage ends). The two rows' images are compared bit for bit.

Per phase, the process's peak RSS (VmHWM, reset at each phase's start: /proc/self/clear_refs), in
GB (10⁹ bytes, the unit of the weights): load (from the process's start: Python and torch
included), text encoding (until the first U-Net call), U-Net steps (until the decode), VAE
decode (the decode and the conversion to an image). The peak does not grow with the step count:
every step frees its activations before the next, and the sampler keeps a few latents (KBs), so 2
steps measure what 20 or 50 would (tests/test_sd15_memory.py compares 1 step with 2).

What the peak is made of: VmHWM has no split, so a thread (RssSampler) reads /proc/self/status
every 5 ms during the run and keeps, per phase, the sample with the largest VmRSS together with
its RssAnon (heap: weights read into RAM, activations, scratch), RssFile (pages of the mapped
file, and the shared libraries' code: ~0.1 GB) and RssShmem (JSON: `sampled_peak_gb`). A spike
shorter than 5 ms can fall between samples, so the sampled VmRSS is at or under the phase's
VmHWM (a fraction of a MB over at times: the kernel's RSS counters are approximate). For SDXL
the report also gives the weights' bytes per network and each phase's peak over all the file's
fp16 weights (issue 17's target: ≤ 1.2×; text encoders included, unlike the 5.30 GB of
`marble bench --arch sdxl`).

`--vae-tiling` (or `--vae-tile-size N`) runs every row's decode as `marble generate --vae-tiling`
does: the VAE in overlapping 512-pixel (N-pixel) tiles, one at a time (marble.models.vae_tiling;
not the untiled image, so compare its rows with an untiled run's peaks, not its pixels). Off by
default.

`--width-divisor N` narrows the U-Net N times (text encoders and VAE whole; the marble config is
then stored in the file): a smoke run, e.g. `--arch sdxl --width-divisor 5 --size 128`.

Wall time of the SDXL run at 1024², estimated (not measured; 2 threads, quiet CPU): writing the
6.94 GB file (3.47 G parameters drawn) 1.5-2 min (`--width-divisor 5`: 1.06 G parameters, 2.12 GB,
written in 37 s on one shared core); per row, loading 10-40 s (in RAM: hash and read 6.9 GB;
--low-memory: hash and map), text encoding 5-15 s, 2 U-Net calls at 1024² CFG batch 2
180-210 s (session 9-10: 89-104 s a call), a 1024² decode 80-90 s: about 5-5.5 min a row.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset"
NEGATIVE = "blurry, low quality"
PHASES = ("load", "text encoding", "U-Net steps", "VAE decode")
ROWS = {"in RAM": False, "--low-memory": True}
SPLIT = ("VmRSS", "RssAnon", "RssFile", "RssShmem")   # read at each phase's largest sampled VmRSS


class Arch(NamedTuple):
    preset: str                 # the released architecture (marble.models.stable_diffusion)
    size: int                   # its native side in pixels: the default --size
    cfg: float                  # its usual CFG: the default --cfg
    target_gb: float | None     # issue 18: SD1.5's peak RSS with fp16 weights on disk, at 512²
    target_ratio: float | None  # issue 17 item 8: SDXL's peak RSS / its fp16 weights, at 1024²


ARCHS = {"sd15": Arch("sd15", 512, 7.5, 3.5, None), "sdxl": Arch("sdxl-base", 1024, 5.0, None, 1.2)}


def read_status() -> dict[str, int]:
    """/proc/self/status's size fields (VmHWM: peak RSS since the last reset; VmRSS: now, the sum
    of RssAnon, RssFile and RssShmem), in bytes, read at one instant."""
    out = {}
    for line in open("/proc/self/status"):
        name, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            out[name] = int(value.split()[0]) * 1024
    if "VmRSS" not in out or "RssAnon" not in out:
        raise RuntimeError("no VmRSS or RssAnon in /proc/self/status (Linux only)")
    return out


class RssSampler:
    """A daemon thread that reads /proc/self/status every `interval` seconds and keeps the sample
    with the largest VmRSS, with its RssAnon / RssFile / RssShmem split. It runs while torch's
    kernels hold no GIL; a spike shorter than the interval can fall between two samples, so the
    sampled VmRSS is at or a little under the phase's VmHWM."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.lock, self.stopped = interval, threading.Lock(), threading.Event()
        self.best = read_status()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            sample = read_status()
            with self.lock:
                if sample["VmRSS"] > self.best["VmRSS"]:
                    self.best = sample

    def take(self) -> dict[str, int]:
        """The largest sample since the last take; the next phase starts from the RSS now."""
        now = read_status()
        with self.lock:
            best, self.best = self.best, now
        return best

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def reset_peak() -> None:
    """VmHWM back to the current RSS (Linux: "5" > /proc/self/clear_refs), to measure one phase."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PhaseClock:
    """Phases closed one after another, each with its seconds and its peak RSS (VmHWM, reset at the
    phase's start); the first phase runs from the clock's creation. With a `sampler`, each phase
    also gets the RssAnon / RssFile / RssShmem split of its largest sampled VmRSS."""

    def __init__(self, sampler: RssSampler | None = None):
        self.phases: list[dict] = []
        self.sampler = sampler
        self.start = time.perf_counter()

    def close(self, phase: str) -> None:
        now, status = time.perf_counter(), read_status()
        reset_peak()
        entry = {"phase": phase, "peak_gb": status["VmHWM"] / 1e9, "end_rss_gb": status["VmRSS"] / 1e9,
                 "seconds": now - self.start}
        if self.sampler is not None:
            sample = self.sampler.take()
            entry["sampled_peak_gb"] = {f: sample[f] / 1e9 for f in SPLIT}
        self.phases.append(entry)
        self.start = now


# --- the file -------------------------------------------------------------------------------------

def drawn_parameters(config) -> dict[str, tuple[torch.nn.Module, str, torch.Tensor]]:
    """marble key -> (module, parameter name, meta tensor) of `config`'s model, built as shapes only."""
    from marble.models.latent_diffusion import LatentDiffusion
    from marble.models.skeleton import skeleton
    with skeleton():
        model = LatentDiffusion(config)
    params = {f"{prefix}.{name}" if prefix else name: (module, name, p)
              for prefix, module in model.named_modules() for name, p in module.named_parameters(recurse=False)}
    missing = set(model.state_dict()) - set(params)
    if missing:
        raise RuntimeError(f"state entries without a drawn value: {sorted(missing)[:5]}")
    return params


def network_bytes(config) -> dict[str, int]:
    """fp16 bytes of each network (unet, text_encoder, vae)."""
    out: dict[str, int] = {}
    for key, (_, _, p) in drawn_parameters(config).items():
        out[key.split(".", 1)[0]] = out.get(key.split(".", 1)[0], 0) + p.numel() * 2
    return out


@torch.no_grad()
def write_fp16_single_file(config, path: Path, seed: int = 0, with_config: bool = False) -> int:
    """`config`'s architecture with seeded random weights, written to `path` as an SD single file in
    fp16; returns the weights' bytes. Streamed: each of the file's tensors is drawn as it is
    written (its marble parts in float32, one by one, rounded to fp16 and renamed, transposed or
    fused by single_file_state), in the file's key order from one generator, so the process holds
    one tensor at a time, never the model (SDXL's fp16 file is 6.9 GB). `with_config`: also store
    the marble config in the metadata (needed for an architecture that is not a released one,
    which a single file cannot declare otherwise)."""
    from marble.checkpoints.checkpoint import Checkpoint
    from marble.checkpoints.sd_single_file import single_file_names, single_file_state
    from marble.config import config_to_json
    from marble.eval.sd_bench import draw_weight
    from marble.fileio import write_new
    from marble.tensor_file import safetensors_writer
    params = drawn_parameters(config)
    name_of = single_file_names(config)
    parts: dict[str, list[str]] = {}   # file key -> the marble keys it is made of
    for key in params:
        parts.setdefault(name_of(key), []).append(key)
    layout = single_file_state(Checkpoint(config, {k: p.to(torch.float16) for k, (_, _, p) in params.items()},
                                          path, "", "marble"))   # meta tensors: the file's shapes
    if set(layout) != set(parts):
        raise RuntimeError(f"file keys without their parts: {sorted(set(layout) ^ set(parts))[:5]}")
    g = torch.Generator().manual_seed(seed)

    def fill(name: str) -> torch.Tensor:
        drawn = {key: draw_weight(params[key][0], params[key][1], torch.empty(params[key][2].shape), g)
                 .to(torch.float16) for key in parts[name]}
        return single_file_state(Checkpoint(config, drawn, path, "", "marble"))[name]

    metadata = {"format": "pt"}
    if with_config:
        metadata["marble_config"] = config_to_json(config)
    write_new(path, safetensors_writer(layout, metadata, fill))
    return sum(p.numel() * 2 for _, _, p in params.values())


# --- one row, in its own process --------------------------------------------------------------------

def generate_measured(path: Path, size: int, steps: int, cfg: float, low_memory: bool, seed: int = 0,
                      storage: torch.dtype | None = torch.float16, quantize: str | None = None,
                      vae_tile_size: int = 0) -> dict:
    """In this (fresh) process: load `path` as `marble generate --weights fp16 [--low-memory]` does
    and generate one image, closing a phase at the first U-Net call, at the decode and at the end.
    `storage`, `quantize`: load_pipeline's (None, None: `marble generate` without --weights);
    `vae_tile_size`: the request's (`--vae-tile-size`; 0: untiled)."""
    from marble.pipeline import load_pipeline
    from marble.request import GenerationRequest, resolve
    from marble.tensor_file import mapped_bytes

    after_imports = read_status()["VmRSS"]
    sampler = RssSampler()
    clock = PhaseClock(sampler)
    phases, close = clock.phases, clock.close

    pipe = load_pipeline(str(path), storage=storage, quantize=quantize, mapped=low_memory)
    model = pipe.model
    mapped = mapped_bytes(model.parameters())
    close("load")

    def first_unet_call(module, args):
        if len(phases) == 1:
            close("text encoding")
    model.unet.register_forward_pre_hook(first_unet_call)

    def first_decoder_call(module, args):   # the whole decode, or its first tile
        if len(phases) == 2:
            close("U-Net steps")
    model.vae.decoder.register_forward_pre_hook(first_decoder_call)
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=seed, steps=steps, sampler="Euler",
                                cfg=cfg, width=size, height=size, vae_tile_size=vae_tile_size)
    image = pipe.generate(resolve(request, pipe.defaults)).images[0]
    close("VAE decode")
    sampler.stop()
    if [p["phase"] for p in phases] != list(PHASES):
        raise RuntimeError(f"phases closed out of order: {[p['phase'] for p in phases]}")
    pixels = np.asarray(image)
    return {"low_memory": low_memory, "after_imports_gb": after_imports / 1e9, "mapped_gb": mapped / 1e9,
            "phases": phases, "peak_gb": max(p["peak_gb"] for p in phases), "threads": torch.get_num_threads(),
            "image_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(), "image_shape": list(pixels.shape)}


def run_child(path: Path, size: int, steps: int, cfg: float, low_memory: bool, threads: int | None,
              vae_tile_size: int = 0) -> dict:
    """generate_measured in a fresh interpreter (this one, this PYTHONPATH): its RSS is that run's alone."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--size", str(size),
           "--steps", str(steps), "--cfg", str(cfg), "--vae-tile-size", str(vae_tile_size)] + \
          (["--low-memory"] if low_memory else []) + (["--threads", str(threads)] if threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"the measured run failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the report -----------------------------------------------------------------------------------

def measure(size: int = 512, steps: int = 2, cfg: float = 7.5, threads: int | None = None, config=None,
            rows: dict[str, bool] = ROWS, log=print, arch: str = "sd15", vae_tile_size: int = 0) -> dict:
    """Write the file once (`config` None: `arch`'s released architecture), then one fresh process
    per row (each with VAE tiles of `vae_tile_size` pixels; 0: untiled); the report as a dict."""
    from marble.cpu_features import cpu_name
    from marble.eval.sdxl_bench import malloc_trim
    from marble.models.stable_diffusion import sd_config
    spec = ARCHS[arch]
    model = config or sd_config(spec.preset)
    with tempfile.TemporaryDirectory(prefix=f"marble-{arch}-memory-") as folder:
        path = Path(folder) / f"{arch}-random-fp16.safetensors"
        t0 = time.perf_counter()
        nbytes = write_fp16_single_file(model, path, with_config=config is not None)
        written = time.perf_counter() - t0
        malloc_trim()   # this parent keeps nothing while the rows run
        log(f"wrote {nbytes / 1e9:.3f} GB of fp16 weights to {path} in {written:.0f} s")
        report = {"settings": {"arch": arch, "model": model.name, "size": size, "steps": steps, "sampler": "Euler",
                               "cfg": cfg, "weights": "fp16", "threads": threads, "vae_tile_size": vae_tile_size},
                  "cpu": cpu_name(), "weights_gb": nbytes / 1e9, "file_gb": path.stat().st_size / 1e9,
                  "networks_gb": {k: v / 1e9 for k, v in network_bytes(model).items()}, "write_seconds": written,
                  "target_gb": spec.target_gb if spec.target_ratio is None else spec.target_ratio * nbytes / 1e9,
                  "target_ratio": spec.target_ratio, "rows": {}}
        for label, low_memory in rows.items():
            log(f"{label}: loading and generating in a fresh process ...")
            t0 = time.perf_counter()
            row = run_child(path, size, steps, cfg, low_memory, threads, vae_tile_size)
            row["wall_seconds"] = time.perf_counter() - t0
            report["rows"][label] = row
            log("  " + ", ".join(f"{p['phase']} {p['peak_gb']:.3f} GB" for p in row["phases"]))
    shas = {r["image_sha256"] for r in report["rows"].values()}
    report["same_image"] = len(shas) == 1
    return report


def at_target_size(report: dict) -> bool:
    """The issues' targets are for the released architecture at its own size."""
    s = report["settings"]
    spec = ARCHS[s["arch"]]
    return s["model"] == spec.preset and s["size"] == spec.size


def ratio_lines(report: dict) -> list[str]:
    """Each phase's peak over the fp16 weights, and what the largest sampled VmRSS was made of."""
    rows, weights = report["rows"], report["weights_gb"]
    labels = list(rows)
    names = {"unet": "U-Net", "text_encoder": "text encoders", "vae": "VAE"}
    lines = ["", "fp16 weights: " + ", ".join(f"{names.get(k, k)} {v:.3f} GB" for k, v in report["networks_gb"].items())
             + f"; {weights:.3f} GB in all.", "",
             "| phase | " + " | ".join(f"{k}: peak / weights | {k}: RssAnon + RssFile at the sampled peak (GB)"
                                       for k in labels) + " |", "|---" * (2 * len(labels) + 1) + "|"]
    for i, phase in enumerate(PHASES):
        cells = []
        for k in labels:
            p = rows[k]["phases"][i]
            cells += [f"{p['peak_gb'] / weights:.2f}×",
                      f"{p['sampled_peak_gb']['RssAnon']:.3f} + {p['sampled_peak_gb']['RssFile']:.3f}"]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    if at_target_size(report):
        ratio = report["target_ratio"]
        met = {k: "met" if rows[k]["peak_gb"] <= report["target_gb"] else "not met" for k in labels}
        cells = [c for k in labels for c in (f"≤ {ratio:g}×: {met[k]}", "")]
        lines.append("| target | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    s, rows = report["settings"], report["rows"]
    labels = list(rows)
    head = (f"{s['model']}, random weights in an fp16 single file ({report['weights_gb']:.3f} GB of weights), "
            f"{s['size']}×{s['size']}, Euler {s['steps']} steps, CFG {s['cfg']:g}, "
            f"{next(iter(rows.values()))['threads']} threads{', ' + report['cpu'] if report['cpu'] else ''}"
            + (f", VAE tiles of {s['vae_tile_size']} px" if s.get("vae_tile_size") else ""))
    lines = [head, "", "| peak RSS (GB, 10⁹ B) | " + " | ".join(f"fp16 weights, {k}" for k in labels) + " |",
             "|---" * (len(labels) + 1) + "|"]
    for i, phase in enumerate(PHASES):
        lines.append(f"| {phase} | " + " | ".join(f"{rows[k]['phases'][i]['peak_gb']:.3f}" for k in labels) + " |")
    lines.append("| **whole run** | " + " | ".join(f"**{rows[k]['peak_gb']:.3f}**" for k in labels) + " |")
    lines.append("| RSS after imports | " + " | ".join(f"{rows[k]['after_imports_gb']:.3f}" for k in labels) + " |")
    lines.append("| weights mapped from the file | " + " | ".join(f"{rows[k]['mapped_gb']:.3f}" for k in labels) + " |")
    if report["target_ratio"] is None and at_target_size(report):
        lines.append("| target | " + " | ".join(f"≤ {report['target_gb']:g}: "
                                               f"{'met' if rows[k]['peak_gb'] <= report['target_gb'] else 'not met'}"
                                               for k in labels) + " |")
    if report["target_ratio"] is not None:
        lines += ratio_lines(report)
    lines += ["", "Seconds per phase: " + "; ".join(
        f"{k}: " + ", ".join(f"{p['phase']} {p['seconds']:.1f}" for p in rows[k]["phases"]) for k in labels)]
    if len(labels) > 1:
        lines.append(f"Images bit for bit equal across rows: {'yes' if report['same_image'] else 'NO'}")
    return "\n".join(lines)


def reduced(config, divisor: int):
    """`config` with its U-Net `divisor` times narrower (model_channels / divisor; text encoders and
    VAE whole): the same layout in a fraction of the time, for a smoke run."""
    from dataclasses import replace
    channels = config.unet.model_channels
    if divisor < 1 or channels % divisor or (channels // divisor) % config.unet.groups:
        raise SystemExit(f"--width-divisor must divide {channels} into a multiple of {config.unet.groups} channels")
    return config.replace(name=f"{config.name}-width-1/{divisor}",
                          unet=replace(config.unet, model_channels=channels // divisor))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=list(ARCHS), default="sd15", help="the released architecture (default sd15)")
    ap.add_argument("--size", type=int, default=None,
                    help="image side in pixels, a multiple of 8 (default: the arch's, 512 or 1024)")
    ap.add_argument("--steps", type=int, default=2, help="Euler steps (the peak does not depend on them)")
    ap.add_argument("--cfg", type=float, default=None, help="default: the arch's usual (7.5 for sd15, 5 for sdxl)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--config", type=Path, default=None,
                    help="another architecture (a LatentDiffusionConfig as JSON), e.g. a reduced SD1.5")
    ap.add_argument("--width-divisor", type=int, default=None,
                    help="the U-Net this many times narrower (e.g. 5: SDXL's at model_channels 64), for a smoke run")
    ap.add_argument("--only", choices=list(ROWS), default=None, help="one row only")
    ap.add_argument("--vae-tiling", dest="vae_tile_size", action="store_const", const=512, default=0,
                    help="decode (every row) in 512-pixel VAE tiles, as `marble generate --vae-tiling`")
    ap.add_argument("--vae-tile-size", dest="vae_tile_size", type=int, help="the same with N-pixel tiles (0: off)")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here (never overwritten)")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--low-memory", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    spec = ARCHS[a.arch]
    size, cfg = a.size or spec.size, spec.cfg if a.cfg is None else a.cfg
    if size <= 0 or size % 8 or a.steps < 1:
        raise SystemExit("--size must be a positive multiple of 8 and --steps >= 1")
    from marble.models.vae_tiling import check_tile_size
    try:   # before the file is written: SD's and SDXL's latent factor 8
        check_tile_size(a.vae_tile_size, 8)
    except ValueError as e:
        raise SystemExit(f"--vae-tile-size: {e}") from None
    if a.child is not None:
        if a.threads:
            torch.set_num_threads(a.threads)
        print(json.dumps(generate_measured(a.child, size, a.steps, cfg, a.low_memory,
                                           vae_tile_size=a.vae_tile_size)))
        return
    if a.json is not None and a.json.exists():
        raise SystemExit(f"{a.json} exists; nothing is overwritten")
    config = None
    if a.config is not None:
        from marble.config import config_from_dict
        from marble.models.latent_diffusion import LatentDiffusionConfig
        config = config_from_dict(LatentDiffusionConfig, json.loads(a.config.read_text()))
    if a.width_divisor is not None:
        from marble.models.stable_diffusion import sd_config
        config = reduced(config or sd_config(spec.preset), a.width_divisor)
    rows = ROWS if a.only is None else {a.only: ROWS[a.only]}
    report = measure(size, a.steps, cfg, a.threads, config, rows, log=lambda m: print(m, file=sys.stderr), arch=a.arch,
                     vae_tile_size=a.vae_tile_size)
    print(markdown(report))
    if a.json is not None:
        from marble.fileio import write_new
        write_new(a.json, json.dumps(report, indent=2).encode("utf-8"))


if __name__ == "__main__":
    main()
