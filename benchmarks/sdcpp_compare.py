"""marble vs diffusers fp32 vs stable-diffusion.cpp on one random-weight SD1.5 single file (issue 18, item 5).

The lead's command (512², 3 Euler steps, CFG 7.5, 2 threads, all 12 default engines, 8 of them sd.cpp
settings; about 30-40 min on the quiet 2-core AVX2 EPYC):

    make bench-sdcpp BENCH_SDCPP_ARGS="--size 512 --steps 3 --cfg 7.5 --threads 2 --json docs/results/sdcpp-compare-512.json --logs /tmp/sdcpp-logs"

which builds .venv-sdcpp once (stable-diffusion-cpp-python from its sdist, -march=native; 10.5 min at
nice 19 on one shared core, 4.8 min of CPU) and runs
    .venv/bin/python benchmarks/sdcpp_compare.py --sdcpp-python .venv-sdcpp/bin/python \\
        --size 512 --steps 3 --cfg 7.5 --threads 2 --json docs/results/sdcpp-compare-512.json --logs /tmp/sdcpp-logs
The estimate: the smoke run (128², 1 step, 1 thread at nice 19 beside a training run) took 8.4 min,
1 min of it writing the file; at 512² a marble or diffusers row is about 1-1.5 min (the issue's
54-59 s an image plus the load) and an sd.cpp row about 3 min (its 169 s an image at default
settings), more if direct convolution is slower at 512² than at 128².

The file: SD1.5's architecture with seeded random weights stored in fp16, written once to a
temporary SD/LDM single file with the original key names (benchmarks/sd15_memory.py's writer), so
every engine reads the very same file as a downloaded checkpoint. Each engine/setting then runs in a
FRESH process (its peak RSS is its own: VmHWM from /proc/self/status, from the process's start, so
Python and the imports are in it), with the same prompt and negative prompt, size, Euler steps on
the default discrete/linspace schedule, CFG and threads, and generates one image:

- marble[-fp16][-lowmem][-int8]: `marble generate FILE` as a user runs it (load_pipeline; -fp16:
  `--weights fp16`, -lowmem: `--low-memory`, -int8: `--quantize int8`), compute in fp32;
- diffusers: diffusers' StableDiffusionPipeline, fp32, Euler, built around the tensors marble reads
  from the file (marble.eval.sd_bench.diffusers_pipeline: renamed, not copied; diffusers cannot
  read a single file offline without its hub config);
- sdcpp[-WTYPE][-fa][-direct]: stable-diffusion.cpp through stable-diffusion-cpp-python in its own
  venv (--sdcpp-python), a small driver run by that python: StableDiffusion(model_path=FILE,
  wtype=WTYPE (default: the file's f16), flash_attn and diffusion_flash_attn (-fa),
  diffusion_conv_direct and vae_conv_direct (-direct), vae_decode_only=True as its CLI does for
  txt2img), then generate_image(sample_method="euler", scheduler="discrete"). Its starting noise
  comes from its own RNG, so its image differs; its cost per step does not.

Timings, per engine: load (the file to a ready model); text encoding; the U-Net steps (first U-Net
call to the decode's start: one CFG-guided step is the conditional and unconditional passes, batched
in marble and diffusers, two passes in sd.cpp), shown per step; the VAE decode; the image (text
encoding to the finished image, the load not in it). marble and diffusers: timed in-process around
their calls (a pre-hook on the U-Net's first call, a wrapper on the VAE's decode). sd.cpp: its API
has no per-phase hook, so text encoding, sampling and decode are parsed from its own log lines
("get_learned_condition completed, taking X s", "sampling completed, taking X s",
"decode_first_stage completed, taking X s"); load and image are wall time around StableDiffusion()
and generate_image() in the driver. One image each, no warm-up: what a one-shot generate sees.

Output: a markdown table (stdout) and, with --json PATH, the report (written atomically, never
over an existing file). A failing engine is a row with its error; the others still run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sd15_memory  # noqa: E402  (the file writer, the phase clock, /proc/self/status)

from marble.cpu_features import cpu_flags, cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEGATIVE, PHASES = sd15_memory.PROMPT, sd15_memory.NEGATIVE, sd15_memory.PHASES
SDCPP_WTYPES = ("f32", "f16", "q8_0", "q5_0", "q4_0")
FLAGS = {"marble": ("fp16", "lowmem", "int8"), "diffusers": (), "sdcpp": SDCPP_WTYPES + ("fa", "direct")}
DEFAULT_ENGINES = ("marble", "marble-fp16-lowmem", "marble-int8", "diffusers",
                   "sdcpp", "sdcpp-f32", "sdcpp-q8_0", "sdcpp-f16-fa", "sdcpp-q8_0-fa",
                   "sdcpp-f16-direct", "sdcpp-f16-fa-direct", "sdcpp-q8_0-fa-direct")
RESULT_MARK = "SDCPP_COMPARE_RESULT "   # the line a child prints its result on (sd.cpp's python prints too)
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
             "amx_int8", "amx_tile")


def parse_engine(name: str) -> dict:
    """"sdcpp-q8_0-fa" -> {"name", "kind": "sdcpp", "flags": ["q8_0", "fa"]}; ValueError with one line."""
    kind, *flags = name.split("-")
    if kind not in FLAGS:
        raise ValueError(f"unknown engine {name!r}: it starts with one of {', '.join(FLAGS)}")
    bad = [f for f in flags if f not in FLAGS[kind]]
    if bad or len(set(flags)) != len(flags):
        raise ValueError(f"engine {name!r}: {kind} takes the flags {', '.join(FLAGS[kind]) or 'none'}, "
                         f"each at most once (e.g. {'sdcpp-q8_0-fa-direct' if kind == 'sdcpp' else kind})")
    if kind == "sdcpp" and sum(f in SDCPP_WTYPES for f in flags) > 1:
        raise ValueError(f"engine {name!r}: one weight type at most")
    return {"name": name, "kind": kind, "flags": flags}


def sdcpp_options(flags: list[str]) -> dict:
    """The StableDiffusion() keyword arguments an sdcpp engine's flags stand for (0.4.x names)."""
    wtype = next((f for f in flags if f in SDCPP_WTYPES), "default")
    fa, direct = "fa" in flags, "direct" in flags
    return {"wtype": wtype, "flash_attn": fa, "diffusion_flash_attn": fa, "diffusion_conv_direct": direct,
            "vae_conv_direct": direct, "vae_decode_only": True}


# --- sd.cpp: the driver its venv's python runs, and its log ------------------------------------------

SDCPP_DRIVER = r'''
import hashlib, json, sys, time
a = json.loads(sys.argv[1])
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
import stable_diffusion_cpp
from stable_diffusion_cpp import StableDiffusion
import stable_diffusion_cpp.stable_diffusion_cpp as low
after_imports = status("VmRSS")
t0 = time.perf_counter()
sd = StableDiffusion(model_path=a["file"], n_threads=a["threads"], verbose=True, **a["options"])
t1 = time.perf_counter()
progress = []
images = sd.generate_image(prompt=a["prompt"], negative_prompt=a["negative"], width=a["size"], height=a["size"],
                           cfg_scale=a["cfg"], sample_method="euler", scheduler="discrete",
                           sample_steps=a["steps"], seed=a["seed"],
                           progress_callback=lambda step, steps, t: progress.append([step, steps, t]))
t2 = time.perf_counter()
pixels = images[0].convert("RGB").tobytes()
print("''' + RESULT_MARK + r'''" + json.dumps({
    "load_s": t1 - t0, "image_s": t2 - t1, "peak_rss_gb": status("VmHWM") / 1e9, "after_imports_gb": after_imports / 1e9,
    "progress": progress, "image_sha256": hashlib.sha256(pixels).hexdigest(), "image_size": list(images[0].size),
    "version": getattr(stable_diffusion_cpp, "__version__", "?"),
    "system_info": " ".join(low.sd_get_system_info().decode("utf-8", "replace").split())}), flush=True)
'''

SDCPP_LOG = {"text_encoding_s": r"get_learned_condition completed, taking ([0-9.]+)\s*s",
             "unet_steps_s": r"sampling completed, taking ([0-9.]+)\s*s",
             "vae_decode_s": r"decode_first_stage completed, taking ([0-9.]+)\s*s",
             "log_load_s": r"loading tensors completed, taking ([0-9.]+)\s*s",
             "log_image_s": r"generate_image completed in ([0-9.]+)\s*s"}


def parse_sdcpp_log(text: str) -> dict:
    """sd.cpp's per-phase seconds from its log (the last match of each line; None where absent)."""
    out = {}
    for key, pattern in SDCPP_LOG.items():
        found = re.findall(pattern, text)
        out[key] = float(found[-1]) if found else None
    return out


def result_line(stdout: str) -> dict:
    """The child's result: the last line that starts with RESULT_MARK."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError("the child printed no result line")


# --- the marble and diffusers children (this interpreter, in a fresh process) -------------------------

def phase_row(phases: list[dict]) -> dict:
    """Seconds per phase (load, text encoding, U-Net steps, VAE decode) -> the table's row fields."""
    if [p["phase"] for p in phases] != list(PHASES):
        raise RuntimeError(f"phases closed out of order: {[p['phase'] for p in phases]}")
    sec = [p["seconds"] for p in phases]
    return {"load_s": sec[0], "text_encoding_s": sec[1], "unet_steps_s": sec[2], "vae_decode_s": sec[3],
            "image_s": sum(sec[1:]), "peak_rss_gb": max(p["peak_gb"] for p in phases)}


def run_marble(path: Path, size: int, steps: int, cfg: float, flags: list[str], seed: int) -> dict:
    import torch
    storage = torch.float16 if "fp16" in flags else None
    row = sd15_memory.generate_measured(path, size, steps, cfg, "lowmem" in flags, seed=seed, storage=storage,
                                        quantize="int8" if "int8" in flags else None)
    return {**phase_row(row["phases"]), "image_sha256": row["image_sha256"], "threads": row["threads"]}


def run_diffusers(path: Path, size: int, steps: int, cfg: float, seed: int) -> dict:
    """diffusers fp32 around the tensors marble reads from `path` (shared, not copied)."""
    import hashlib

    import numpy as np
    import torch

    from marble.eval.sd_bench import diffusers_pipeline
    from marble.pipeline import load_pipeline
    clock = sd15_memory.PhaseClock()
    model = load_pipeline(str(path)).model
    pipe = diffusers_pipeline(model)
    clock.close("load")
    pipe.unet.register_forward_pre_hook(lambda m, a: clock.close("text encoding") if len(clock.phases) == 1 else None)
    decode = pipe.vae.decode

    def decode_closing(*args, **kwargs):
        clock.close("U-Net steps")
        return decode(*args, **kwargs)
    pipe.vae.decode = decode_closing   # an instance attribute: the pipeline's self.vae.decode finds it
    with torch.inference_mode():
        image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=cfg, height=size,
                     width=size, generator=torch.Generator().manual_seed(seed)).images[0]
    clock.close("VAE decode")
    pixels = np.asarray(image)
    return {**phase_row(clock.phases), "image_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
            "threads": torch.get_num_threads()}


def child_main(engine: str, path: Path, size: int, steps: int, cfg: float, threads: int, seed: int) -> None:
    import torch
    torch.set_num_threads(threads)
    e = parse_engine(engine)
    row = (run_marble(path, size, steps, cfg, e["flags"], seed) if e["kind"] == "marble"
           else run_diffusers(path, size, steps, cfg, seed))
    print(RESULT_MARK + json.dumps(row), flush=True)


# --- the parent -----------------------------------------------------------------------------------------

def run_engine(engine: dict, path: Path, s: dict, sdcpp_python: Path | None, logs: Path | None = None) -> dict:
    """One engine in a fresh process; its row ("error" set if it failed). `logs`: keep its output there."""
    env = {**os.environ, "OMP_NUM_THREADS": str(s["threads"])}
    if engine["kind"] == "sdcpp":
        options = sdcpp_options(engine["flags"])
        args = {"file": str(path), "threads": s["threads"], "options": options, "prompt": PROMPT,
                "negative": NEGATIVE, "size": s["size"], "cfg": s["cfg"], "steps": s["steps"], "seed": s["seed"]}
        cmd = [str(sdcpp_python), "-c", SDCPP_DRIVER, json.dumps(args)]
        timing = "sd.cpp's log (text, sampling, decode); wall time around its calls (load, image)"
    else:
        options = {"flags": engine["flags"]}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine["name"], "--file", str(path),
               "--size", str(s["size"]), "--steps", str(s["steps"]), "--cfg", str(s["cfg"]),
               "--threads", str(s["threads"]), "--seed", str(s["seed"])]
        timing = "in-process hooks (U-Net pre-hook, VAE decode wrapper)"
    row = {"engine": engine["name"], "kind": engine["kind"], "options": options, "timing": timing, "error": None}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    row["wall_s"] = time.perf_counter() - t0
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{engine['name']}.log").write_text(f"$ {' '.join(cmd[:1] + cmd[3:] if cmd[1] == '-c' else cmd)}\n"
                                                    f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}")
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-600:]}")
        result = result_line(proc.stdout)
        if engine["kind"] == "sdcpp":
            logged = parse_sdcpp_log(proc.stderr + proc.stdout)
            missing = [k for k in ("text_encoding_s", "unet_steps_s", "vae_decode_s") if logged[k] is None]
            if missing:
                raise RuntimeError(f"no {', '.join(missing)} in sd.cpp's log: {proc.stderr.strip()[-600:]}")
            result = {**result, **logged}
        row.update(result)
        row["unet_step_s"] = row["unet_steps_s"] / s["steps"]
    except (RuntimeError, ValueError, KeyError) as err:
        row["error"] = " ".join(str(err).split())[:800]
    return row


def fastest(rows: list[dict], kind: str) -> dict | None:
    done = [r for r in rows if r["kind"] == kind and not r["error"]]
    return min(done, key=lambda r: r["image_s"]) if done else None


def markdown(report: dict) -> str:
    s, rows = report["settings"], report["rows"]
    base = next((r for r in rows if r["engine"] == "marble" and not r["error"]), None)
    fmt = lambda v, d=2: "—" if v is None else f"{v:.{d}f}"   # noqa: E731
    lines = [f"SD1.5 architecture, random weights, one fp16 SD single file ({report['file_gb']:.3f} GB), "
             f"{s['size']}×{s['size']}, Euler {s['steps']} steps (discrete schedule), CFG {s['cfg']:g}, "
             f"{s['threads']} threads; one image per fresh process",
             f"CPU: {report['cpu'] or '?'}; flags: {' '.join(report['cpu_flags']) or 'none of ' + ', '.join(CPU_FLAGS)}",
             "", "| engine | load s | text s | U-Net step s | VAE decode s | image s | peak RSS GB | image ÷ marble |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['engine']} | failed: {r['error'][:160]} | | | | | | |")
            continue
        ratio = f"{r['image_s'] / base['image_s']:.2f}" if base else "—"
        lines.append(f"| {r['engine']} | {fmt(r['load_s'], 1)} | {fmt(r['text_encoding_s'])} | {fmt(r['unet_step_s'])} "
                     f"| {fmt(r['vae_decode_s'])} | {fmt(r['image_s'])} | {fmt(r['peak_rss_gb'], 3)} | {ratio} |")
    lines.append("")
    best_sd, best_m = fastest(rows, "sdcpp"), fastest(rows, "marble")
    if best_sd and best_m:
        lines.append(f"Fastest sd.cpp: {best_sd['engine']} {best_sd['image_s']:.2f} s an image; fastest marble: "
                     f"{best_m['engine']} {best_m['image_s']:.2f} s, {best_m['image_s'] / best_sd['image_s']:.2f}× "
                     f"({'faster' if best_m['image_s'] < best_sd['image_s'] else 'NOT faster'}).")
    sd = next((r for r in rows if r["kind"] == "sdcpp" and not r["error"]), None)
    if sd:
        lines.append(f"stable-diffusion-cpp-python {sd.get('version', '?')}; {sd.get('system_info', '')}")
    lines.append("Timing: marble and diffusers in-process around their calls; sd.cpp's text, U-Net and decode "
                 "from its own log. Engine wall times (s): " + ", ".join(f"{r['engine']} {r['wall_s']:.0f}" for r in rows))
    return "\n".join(lines)


def shown_flags() -> list[str]:
    have = cpu_flags()
    return [f for f in CPU_FLAGS if f in have]


def measure(engines: list[dict], s: dict, sdcpp_python: Path | None, config=None, log=print,
            logs: Path | None = None) -> dict:
    """Write the file once (None: SD1.5's architecture), then each engine in a fresh process."""
    from marble.eval.sdxl_bench import malloc_trim
    from marble.models.stable_diffusion import sd_config
    with tempfile.TemporaryDirectory(prefix="marble-sdcpp-compare-") as folder:
        path = Path(folder) / "sd15-random-fp16.safetensors"
        t0 = time.perf_counter()
        nbytes = sd15_memory.write_fp16_single_file(config or sd_config("sd15"), path, seed=s["seed"],
                                                    with_config=config is not None)
        malloc_trim()   # this parent holds nothing while the engines run
        log(f"wrote {nbytes / 1e9:.3f} GB of fp16 weights to {path} in {time.perf_counter() - t0:.0f} s")
        report = {"settings": {**s, "sampler": "Euler", "schedule": "discrete (linspace)", "prompt": PROMPT,
                               "negative_prompt": NEGATIVE, "model": "sd15" if config is None else "custom"},
                  "cpu": cpu_name(), "cpu_flags": shown_flags(), "file_gb": path.stat().st_size / 1e9, "rows": []}
        for engine in engines:
            log(f"{engine['name']}: a fresh process ...")
            row = run_engine(engine, path, s, sdcpp_python, logs)
            report["rows"].append(row)
            log(f"  failed: {row['error']}" if row["error"] else
                f"  image {row['image_s']:.2f} s, U-Net step {row['unet_step_s']:.2f} s, decode "
                f"{row['vae_decode_s']:.2f} s, peak {row['peak_rss_gb']:.3f} GB ({row['wall_s']:.0f} s wall)")
    best_sd, best_m = fastest(report["rows"], "sdcpp"), fastest(report["rows"], "marble")
    report["fastest_sdcpp"] = best_sd and best_sd["engine"]
    report["fastest_marble"] = best_m and best_m["engine"]
    report["fastest_marble_over_fastest_sdcpp"] = best_sd and best_m and best_m["image_s"] / best_sd["image_s"]
    return report


def write_json(path: Path, report: dict) -> None:
    """Atomically, never over an existing file (FileExistsError)."""
    from marble.fileio import write_new
    write_new(path, json.dumps(report, indent=2).encode("utf-8"))


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit 2, nothing run or written."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (a multiple of 64)")
    ap.add_argument("--steps", type=int, default=3, help="Euler steps")
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                    help="comma-separated: marble[-fp16][-lowmem][-int8], diffusers, "
                         f"sdcpp[-WTYPE][-fa][-direct] with WTYPE one of {', '.join(SDCPP_WTYPES)}")
    ap.add_argument("--sdcpp-python", type=Path, default=ROOT / ".venv-sdcpp" / "bin" / "python",
                    help="the python of the venv stable-diffusion-cpp-python is installed in (make bench-sdcpp)")
    ap.add_argument("--config", type=Path, default=None,
                    help="another architecture (a LatentDiffusionConfig as JSON; marble and diffusers only)")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here (never overwritten)")
    ap.add_argument("--logs", type=Path, default=None, help="keep each engine's output in DIR/ENGINE.log")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--file", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        child_main(a.child, a.file, a.size, a.steps, a.cfg, a.threads, a.seed)
        return
    try:
        engines = [parse_engine(n.strip()) for n in a.engines.split(",") if n.strip()]
    except ValueError as err:
        return fail(f"--engines: {err}")
    if not engines:
        return fail("--engines: none given")
    if a.size <= 0 or a.size % 64 or a.steps < 1 or a.threads < 1 or a.cfg < 1:
        return fail("--size must be a positive multiple of 64, --steps and --threads >= 1, --cfg >= 1")
    if a.json is not None and a.json.exists():
        return fail(f"{a.json} exists; nothing is overwritten")
    if any(e["kind"] == "sdcpp" for e in engines) and not a.sdcpp_python.exists():
        return fail(f"no sd.cpp python at {a.sdcpp_python}: `make bench-sdcpp` builds .venv-sdcpp, "
                         "or pass --sdcpp-python, or leave the sdcpp engines out of --engines")
    config = None
    if a.config is not None:
        if any(e["kind"] == "sdcpp" for e in engines):
            return fail("--config: sd.cpp reads released architectures only; leave the sdcpp engines out")
        from marble.config import config_from_dict
        from marble.models.latent_diffusion import LatentDiffusionConfig
        config = config_from_dict(LatentDiffusionConfig, json.loads(a.config.read_text()))
    settings = {"size": a.size, "steps": a.steps, "cfg": a.cfg, "threads": a.threads, "seed": a.seed}
    report = measure(engines, settings, a.sdcpp_python, config,
                     log=lambda m: print(m, file=sys.stderr, flush=True), logs=a.logs)
    print(markdown(report))
    if a.json is not None:
        write_json(a.json, report)


if __name__ == "__main__":
    main()
