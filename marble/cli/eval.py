"""`marble eval`: the GenEval-style benchmark on the shapes world, the bias/diversity probe, and the
benchmark controlled by each prompt's sketch (`--control sketch`)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import typer

from marble.cli.app import app, fail, info, warn
from marble.cli.compute import apply_threads, dtype_option, read_dtype, threads_option, trace_option
from marble.cpu_features import dtype_name

BASELINES = ("groundtruth", "noise")
SHEET_TILES = 96        # most images on a contact sheet (first seed, spread over the prompts)
PROBE_MIN_SEEDS = 8     # diversity needs several images per probe prompt


def model_source(model: str | None, sampler: str | None, steps: int | None, cfg: float | None,
                 loras: list[str] | None = None, dtype=None, trace: bool = False,
                 deepcache: int | None = None, tome: float | None = None, quantize: str | None = None):
    """The adapter from a marble model to the benchmark's `generate(prompt, seed) -> image`.
    Validates the sampling options before any image is made. `loras` (`PATH[:WEIGHT]`) are fused
    into the loaded model: every image of the run uses them. `deepcache`, `tome`, `quantize`: the
    approximations (docs/bench.md), for every image."""
    pipe, settings = load_source(model, sampler, steps, cfg, loras, dtype, trace, deepcache, tome, quantize)

    def generate(prompt: str, seed: int):
        return pipe.generate_image(prompt, seed=seed, steps=steps, sampler=sampler, cfg=cfg, deepcache=deepcache,
                                   tome=tome)
    return generate, settings


def load_source(model: str | None, sampler: str | None, steps: int | None, cfg: float | None,
                loras: list[str] | None = None, dtype=None, trace: bool = False,
                deepcache: int | None = None, tome: float | None = None, quantize: str | None = None):
    """The pipeline model_source generates with, and the settings it reports (exit 2 on bad input)."""
    from marble.errors import ModelLoadError
    from marble.pipeline import load_pipeline
    from marble.request import GenerationRequest, RequestError, resolve
    try:
        pipe = load_pipeline(model, trace=trace, quantize=quantize, **({} if dtype is None else {"dtype": dtype}))
        resolved = resolve(GenerationRequest(prompt="a shape", seed=0, steps=steps, sampler=sampler, cfg=cfg,
                                             deepcache=deepcache, tome=tome), pipe.defaults)
        applied = _fuse_loras(pipe.model, loras or [])
    except (ModelLoadError, RequestError) as e:
        fail(str(e))
    # the settings actually used (the model's defaults filled in), so the JSON says what was run
    return pipe, {"model_name": pipe.name, "model_hash": pipe.loaded.hash, "sampler": resolved.sampler,
                  "steps": resolved.steps, "cfg": resolved.cfg, "loras": applied,
                  "dtype": dtype_name(pipe.model.dtype), "deepcache": resolved.deepcache, "tome": resolved.tome,
                  "quantize": pipe.quantize}


def _fuse_loras(model, loras: list[str]) -> list[dict]:
    """Read every `PATH[:WEIGHT]` (LoraError, a ModelLoadError, on the first bad one, before any is
    fused) and fuse them; what was applied, for the report."""
    if not loras:
        return []
    from marble.adapters.lora import LoraUse, fuse
    from marble.adapters.lora_files import read_lora
    from marble.adapters.lora_folder import parse_lora_arg
    from marble.adapters.lora_table import module_table
    table = module_table(model)
    uses = []
    for text in loras:
        path, weight = parse_lora_arg(text)
        uses.append(LoraUse(read_lora(Path(path).expanduser(), table), weight, weight))
    fuse(model, uses, table)
    return [{"name": u.lora.name, "hash": u.lora.hash, "weight": u.unet, "path": path}
            for u, path in zip(uses, (parse_lora_arg(t)[0] for t in loras))]


def _check_target(path: Path | None, flag: str) -> None:
    if path is None:
        return
    if path.exists():
        fail(f"{flag} {path} already exists; marble never overwrites a file")
    if path.parent.exists() and not path.parent.is_dir():
        fail(f"{flag} {path}: {path.parent} is not a folder")


def _write_new(path: Path, data: bytes, flag: str) -> None:
    from marble.fileio import write_new
    try:
        write_new(path, data)
    except FileExistsError:
        fail(f"{flag} {path} already exists; marble never overwrites a file")
    except OSError as e:
        fail(f"cannot write {flag} {path}: {e.strerror or e}")


@app.command("eval")
def eval_command(
    model: str = typer.Option("builtin", "--model", help="A model (name or .safetensors path), or a baseline: "
                              "'groundtruth' (the world draws each prompt, scores ~1) or 'noise' (random pixels, ~0)."),
    split: str = typer.Option("seen", "--split", help="Prompts from seen compositions, or from held-out ones "
                              "(never in the training split), or the heart concept's: "
                              "seen | heldout | concept | concept-new."),
    seeds: int = typer.Option(1, "--seeds", help="Images per prompt, seeds 0..K-1."),
    json_out: Path = typer.Option(..., "--json", help="Write the full results here (new file)."),
    sheet: Optional[Path] = typer.Option(None, "--sheet", help="Also write a contact sheet PNG of samples marked pass/fail."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Sampler name (models only). Default: the model's."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (models only). Default: the model's."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance scale (models only). Default: the model's."),
    prompts: int = typer.Option(200, "--prompts", help="About this many prompts, split over the six categories."),
    probe: bool = typer.Option(False, "--probe", help="Also run the bias and homogeneity probe on under-specified prompts "
                               "(with max(K, 8) seeds each)."),
    threads: int = threads_option(),
    dtype: str = dtype_option(),
    trace: bool = trace_option(),
    lora: list[str] = typer.Option([], "--lora", help="PATH[:WEIGHT]: a LoRA file fused into the model for the "
                                   "whole run (repeatable; weight 1 by default). Models only."),
    control: Optional[str] = typer.Option(None, "--control", help="'sketch': each prompt's scene, sketched "
                                          "(flat-coloured silhouettes), is the control image of --control-model; "
                                          "the same prompts also run without it, side by side in the JSON."),
    control_model: Optional[Path] = typer.Option(None, "--control-model", help="The ControlNet for --control "
                                                 "(default: the shipped models/controlnet/builtin-sketch.safetensors)."),
    control_weight: Optional[float] = typer.Option(None, "--control-weight", help="With --control: the ControlNet's "
                                                   "weight (conditioning scale), 0..2 (default 1)."),
    control_mode: Optional[str] = typer.Option(None, "--control-mode", help="With --control: balanced (default), "
                                               "prompt ('My prompt is more important') or control ('ControlNet is "
                                               "more important'); the names and indices generate takes."),
    control_start: Optional[float] = typer.Option(None, "--control-start", help="With --control: fraction of the "
                                                  "steps where it starts acting, 0..1 (default 0)."),
    control_end: Optional[float] = typer.Option(None, "--control-end", help="With --control: fraction of the steps "
                                                "where it stops, 0..1 (default 1)."),
    control_only: bool = typer.Option(False, "--control-only", help="With --control: skip the run without the "
                                      "ControlNet (it does not depend on the --control-* settings: a sweep needs it once)."),
    regions: Optional[float] = typer.Option(None, "--regions", help="With --control: also bind the caption's colour "
                                            "phrases to the sketch's colour regions (generate's --regions), this "
                                            "strong, 0..10."),
    scenes: str = typer.Option("prompt", "--scenes", help="With --control: 'prompt' (each prompt's one scene, "
                               "sketched for all its seeds) or 'image' (a scene of its own for every image: as "
                               "many layouts as images). docs/controlnet-training.md#evaluating-it."),
    categories: Optional[str] = typer.Option(None, "--categories", help="Only these categories, comma-separated "
                                             "(e.g. position,color_attr); each keeps the prompts it has in the full "
                                             "run of --prompts. Default: all six."),
    deepcache: Optional[int] = typer.Option(None, "--deepcache", help="Approximation: DeepCache interval, 1..100 (1 = off). Models only; docs/bench.md."),
    tome: Optional[float] = typer.Option(None, "--tome", help="Approximation: ToMe ratio, 0..0.75 (0 = off). Models only; docs/bench.md."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Approximation: 'int8' (dynamic int8 U-Net transformers). Models only; docs/bench.md."),
) -> None:
    """Score a model on six GenEval categories (single object, two objects, counting, colors,
    position, color attribution) with an exact detector; prints a markdown table and writes JSON
    with per-image verdicts. See docs/eval.md."""
    from marble.eval.benchmark import markdown_table
    from marble.eval.prompts import build_prompts

    _check_flags(split, seeds, prompts, threads, json_out, sheet)
    counts = category_counts(prompts, categories)
    _warn_repeats(split, prompts, counts)
    unit = {"weight": control_weight, "mode": control_mode, "start": control_start, "end": control_end}
    unit_flags = [f"--control-{k}" for k, v in unit.items() if v is not None] + (["--control-only"] if control_only else []) \
        + (["--regions"] if regions is not None else []) + (["--scenes"] if scenes != "prompt" else [])
    if control is not None or control_model is not None or unit_flags:
        if deepcache is not None or tome is not None or quantize is not None:
            fail("--control runs the exact path: leave out --deepcache, --tome and --quantize")
        control_path = check_control(control, control_model, model, probe, unit_flags)
        from marble.eval.control import SCENES_PER
        if scenes not in SCENES_PER:
            fail(f"--scenes must be one of {', '.join(SCENES_PER)}, got {scenes!r}")
        from marble.eval.prompts import scale_counts
        full = build_prompts(split, scale_counts(prompts))    # a --categories subset keeps its prompts and scenes
        prompt_list = [p for p in full if p.category in counts]
        report, tiles = control_eval(model, control_path, prompt_list, list(range(seeds)), split, sampler, steps, cfg,
                                     threads, lora, dtype, trace, keep_tiles=sheet is not None,
                                     unit={k: v for k, v in unit.items() if v is not None}, baseline=not control_only,
                                     regions=regions, scenes_per=scenes,
                                     full_prompts=full)
        _write_new(json_out, (json.dumps(report, indent=1) + "\n").encode(), "--json")
        if sheet is not None:
            _write_sheet(sheet, tiles, group=2)
        return
    prompt_list = build_prompts(split, counts)
    generate, extra = _source(model, prompt_list, sampler, steps, cfg, threads, lora, dtype, trace,
                              dict(deepcache=deepcache, tome=tome, quantize=quantize))
    seed_list = list(range(seeds))
    result, tiles = _run(generate, prompt_list, seed_list, split, keep_tiles=sheet is not None)
    report = {"benchmark": "marble-geneval", "version": 1, "model": model, "sampler": sampler, "steps": steps,
              "cfg": cfg, **extra, "split": split, "seeds": seed_list, **result.to_dict()}
    typer.echo(markdown_table(result))
    info(f"{report['images']} images in {result.seconds:.1f} s")
    if probe:
        from marble.eval.probe import probe_table
        report.update(_probe(generate, seeds))
        typer.echo("")
        typer.echo(probe_table(report["probe"]))
    _write_new(json_out, (json.dumps(report, indent=1) + "\n").encode(), "--json")
    if sheet is not None:
        _write_sheet(sheet, tiles)


def _warn_repeats(split: str, prompts: int, counts: dict[str, int]) -> None:
    from marble.eval.prompts import repeated
    over = repeated(split, counts)
    if over:
        listed = ", ".join(f"{c} {asked} of {distinct}" for c, (asked, distinct) in over.items())
        warn(f"--prompts {prompts} repeats texts ({listed} distinct): a repeated text at one seed is the same "
             "image, scored again; add seeds instead")


def _check_flags(split: str, seeds: int, prompts: int, threads: int, json_out: Path, sheet: Path | None) -> None:
    from marble.eval.prompts import SPLITS
    if split not in SPLITS:
        fail(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if seeds < 1:
        fail(f"--seeds must be >= 1, got {seeds}")
    if prompts < 1:
        fail(f"--prompts must be >= 1, got {prompts}")
    if threads < 0:
        fail(f"--threads must be >= 0, got {threads}")
    if sheet is not None and sheet.resolve() == json_out.resolve():
        fail("--sheet and --json must be different files")
    _check_target(json_out, "--json")
    _check_target(sheet, "--sheet")


def category_counts(prompts: int, categories: str | None) -> dict[str, int]:
    """Prompts per category for about `prompts` in all, kept to `--categories` (exit 2 on an unknown name)."""
    from marble.eval.prompts import pick_categories, scale_counts
    counts = scale_counts(prompts)
    if categories is None:
        return counts
    try:
        keep = pick_categories(categories)
    except ValueError as e:
        fail(f"--categories: {e}")
    return {c: n for c, n in counts.items() if c in keep}


def _source(model: str, prompt_list, sampler: str | None, steps: int | None, cfg: float | None, threads: int,
            loras: list[str] = (), dtype: str = "auto", trace: bool = False, approximations: dict | None = None):
    """`generate(prompt, seed) -> image` for a model or a baseline, and the settings to report."""
    from marble.eval import baselines
    approximations = {k: v for k, v in (approximations or {}).items() if v is not None}
    if model not in BASELINES:
        from marble.cli.generate import read_quantize
        quantize = read_quantize(approximations.pop("quantize", None))
        # int8 kernels take float32 activations: auto means fp32 with --quantize
        compute_dtype = read_dtype("fp32" if dtype == "auto" and quantize else dtype)
        apply_threads(threads)
        return model_source(model, sampler, steps, cfg, list(loras), compute_dtype, trace, quantize=quantize,
                            **approximations)
    if approximations:
        fail(f"--deepcache, --tome and --quantize apply to models, not to the {model} baseline")
    if loras:
        fail(f"--lora applies to models, not to the {model} baseline")
    if sampler is not None or steps is not None or cfg is not None:
        warn(f"--sampler, --steps and --cfg do not apply to the {model} baseline; ignored")
    if model == "groundtruth":
        from marble.eval.probe import probe_prompts
        return baselines.groundtruth(prompt_list + probe_prompts()), {}
    return baselines.noise(), {}


def _run(generate, prompt_list, seed_list: list[int], split: str, keep_tiles: bool):
    """The benchmark with a progress bar; the first seed's images as sheet tiles when wanted."""
    from tqdm import tqdm

    from marble.eval.benchmark import run_benchmark
    tiles = []
    bar = tqdm(total=len(prompt_list) * len(seed_list), unit="image", desc=f"eval {split}", leave=False)

    def on_image(prompt, seed, image, passed):
        bar.update(1)
        if keep_tiles and seed == seed_list[0]:
            tiles.append((image, passed, f"[{prompt.category}] {prompt.text}"))

    try:
        return run_benchmark(generate, prompt_list, seed_list, on_image=on_image), tiles
    finally:
        bar.close()


def _probe(generate, seeds: int) -> dict:
    import time

    from marble.eval.probe import run_probe
    start = time.perf_counter()
    probe_seeds = list(range(max(seeds, PROBE_MIN_SEEDS)))
    probe = run_probe(generate, probe_seeds)
    return {"probe_seeds": probe_seeds, "probe": probe, "probe_seconds": round(time.perf_counter() - start, 3)}


def _write_sheet(sheet: Path, tiles: list, group: int = 1) -> None:
    """At most SHEET_TILES tiles, spread over the prompts; `group` tiles that belong together (a
    control image and its result) are kept or dropped together."""
    from marble.eval.sheet import contact_sheet
    groups = [tiles[i:i + group] for i in range(0, len(tiles), group)]
    step = max(1, -(-len(tiles) // SHEET_TILES))
    buf = io.BytesIO()
    contact_sheet([t for g in groups[::step] for t in g]).save(buf, format="PNG")
    _write_new(sheet, buf.getvalue(), "--sheet")


# --- --control sketch: the benchmark controlled by each prompt's sketch (marble/eval/control.py) ---

CONTROLS = ("sketch",)
DEFAULT_CONTROLNET = "controlnet/builtin-sketch.safetensors"   # in models/controlnet: the server lists it too


def check_control(control: str | None, control_model: Path | None, model: str, probe: bool,
                  unit_flags: list[str] = ()) -> Path:
    """The ControlNet file to use; one line and exit 2 for anything that cannot run."""
    if control is None:
        fail(f"{(['--control-model'] if control_model is not None else list(unit_flags))[0]} needs --control sketch")
    if control not in CONTROLS:
        fail(f"--control must be one of {', '.join(CONTROLS)}, got {control!r}")
    if model in BASELINES:
        fail(f"--control applies to models, not to the {model} baseline")
    if probe:
        fail("--probe does not apply with --control (its prompts have no scenes to sketch)")
    if control_model is None:
        from marble.checkpoints.resolve import models_dir
        path = models_dir() / DEFAULT_CONTROLNET
        if not path.is_file():
            fail(f"no ControlNet at {path}: train it (marble train controlnet configs/builtin-controlnet.toml, "
                 "see docs/controlnet-training.md) or pass --control-model PATH")
        return path
    path = control_model.expanduser()
    if not path.exists():
        fail(f"--control-model {control_model}: no such file")
    return path.resolve()


def control_eval(model: str, control_path: Path, prompt_list, seed_list: list[int], split: str, sampler, steps, cfg,
                 threads: int, loras, dtype: str, trace: bool, keep_tiles: bool, unit: dict | None = None,
                 baseline: bool = True, regions: float | None = None, scenes_per: str = "prompt",
                 full_prompts=()) -> tuple[dict, list]:
    """Both runs on one loaded model: with the sketch ControlNet, then (`baseline`) without it.
    `unit`: the ControlNet unit's weight, mode, start and end where given (ControlSpec's defaults
    otherwise); `regions`: the strength binding the caption's colour phrases to the sketch
    (marble.adapters.regions) in the controlled run; `scenes_per`: one scene a prompt or one an
    image (marble.eval.control); `full_prompts`: the whole run's prompts when `prompt_list` is a
    --categories subset of it, so that each text is sketched as in the whole run. Prints the
    side-by-side table and returns the JSON report and the controlled run's sheet tiles."""
    from dataclasses import replace

    from PIL import Image

    from marble.adapters.controlnet import ControlSpec
    from marble.errors import ModelLoadError
    from marble.eval.benchmark import markdown_table
    from marble.data.sketch import sketch
    from marble.eval.control import (bar_verdict, comparison_table, image_scenes, prompt_scenes, scene_keys,
                                     side_by_side, sketch_source)
    from marble.request import GenerationRequest, RequestError, resolve

    compute_dtype = read_dtype(dtype)
    apply_threads(threads)
    pipe, settings = load_source(model, sampler, steps, cfg, list(loras), compute_dtype, trace)
    spec = ControlSpec(image=Image.new("RGB", (8, 8)), model=str(control_path), is_path=True, resize="Just Resize",
                       **(unit or {}))
    try:
        # generate's checks and mode names (marble.request): the unit every controlled image uses
        req = resolve(GenerationRequest(prompt="a shape", seed=0, controls=(spec,), regions=regions), pipe.defaults)
        loaded = pipe.controlnets.get(spec)    # a file for another architecture: exit 2 before any image
    except (ModelLoadError, RequestError) as e:
        fail(str(e))
    spec = req.controls[0]
    base_hash = _base_hash(control_path)
    if base_hash and base_hash != pipe.loaded.hash:
        warn(f"the ControlNet {loaded.name} was trained for the model with hash {base_hash}; this one's is "
             f"{pipe.loaded.hash}: retrain it for this model (docs/controlnet-training.md)")

    def controlled(prompt: str, seed: int, image):
        return pipe.generate_image(prompt, seed=seed, steps=steps, sampler=sampler, cfg=cfg,
                                   controls=(replace(spec, image=image),), regions=regions)

    def plain(prompt: str, seed: int):
        return pipe.generate_image(prompt, seed=seed, steps=steps, sampler=sampler, cfg=cfg)

    size = min(req.width, req.height)
    scenes = (prompt_scenes(prompt_list, size, full_prompts) if scenes_per == "prompt"
              else image_scenes(prompt_list, seed_list, size, full_prompts))
    key = scene_keys(scenes_per)
    with_result, tiles = _run(sketch_source(controlled, scenes, size, key), prompt_list, seed_list,
                              f"{split} + sketch", keep_tiles)
    # the sheet pairs each result (the first seed's) with the sketch that steered it; a tile's
    # caption is "[category] text"
    tiles = [t for tile in tiles
             for t in ((sketch(scenes[key(tile[2].split("] ", 1)[1], seed_list[0])], size), None, "sketch"), tile)]
    with_d = with_result.to_dict()
    typer.echo(markdown_table(with_result))
    if baseline:
        without_result, _ = _run(plain, prompt_list, seed_list, split, False)
        without_d = without_result.to_dict()
        table = side_by_side(with_d, without_d)
        typer.echo("")
        typer.echo(comparison_table(table))
        info(f"{with_d['images'] + without_d['images']} images in {with_result.seconds + without_result.seconds:.1f} s")
    else:
        without_d, table = None, side_by_side(with_d, None)
        info(f"{with_d['images']} images in {with_result.seconds:.1f} s (--control-only: no run without it)")
    report = {"benchmark": "marble-geneval", "version": 1, "model": model, "sampler": sampler, "steps": steps,
              "cfg": cfg, **settings, "split": split, "seeds": seed_list, "control": "sketch",
              "control_model": {"name": loaded.name, "hash": loaded.hash, "path": str(control_path),
                                "base_model_hash": base_hash},
              "control_settings": {"weight": spec.weight, "mode": spec.mode, "start": spec.start, "end": spec.end,
                                   "resize": spec.resize, "regions": req.regions},
              "scenes_per": scenes_per,
              "side_by_side": table, "bar": bar_verdict(table), "with_control": with_d, "without_control": without_d,
              "scenes": {text: scene.to_dict() for text, scene in scenes.items()}}
    return report, tiles


def _base_hash(path: Path) -> str | None:
    """The base model a marble-trained ControlNet file names in its metadata (None for other files)."""
    if not path.is_file():
        return None
    from marble.errors import ModelLoadError
    from marble.tensor_file import read_header
    try:
        return read_header(path).metadata.get("base_model_hash")
    except ModelLoadError:
        return None
