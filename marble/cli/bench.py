"""`marble bench`: time the SD1.5 architecture in marble and in diffusers on the same random weights,
or (--model) one model through the whole pipeline."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from marble.cli.app import app, fail, info


@app.command()
def bench(
    arch: str = typer.Option("sd15", "--arch", help="sd15: whole images, U-Net steps and decodes in one process; sdxl: one SDXL U-Net step (CFG batch 2) and one VAE decode, marble and diffusers each in its own subprocess, with peak RSS."),
    steps: int = typer.Option(20, "--steps", help="Euler steps per image."),
    size: Optional[int] = typer.Option(None, "--size", help="Image side in pixels (a multiple of 8). Default: 512 (sd15), 1024 (sdxl)."),
    weights: str = typer.Option("fp16", "--weights", help="--arch sdxl: marble keeps its weights in fp16, bf16 or fp32 (computing in fp32); diffusers runs fp32 on the same values."),
    low_memory: bool = typer.Option(False, "--low-memory", help="--arch sdxl: marble's weights go through a temporary safetensors file (in $TMPDIR, which needs their size free on disk) and come back as views of its memory map; the VAE's pages are released before the U-Net call and the U-Net's before the decode, as `marble generate --low-memory` does."),
    cfg: float = typer.Option(7.5, "--cfg", help="Classifier-free guidance scale."),
    unet_calls: int = typer.Option(3, "--unet-calls", help="Timed U-Net calls (median); 0 skips."),
    quick: bool = typer.Option(False, "--quick", help="Minutes, not a quarter hour: 2 steps per image, one timed U-Net call and decode."),
    no_images: bool = typer.Option(False, "--no-images", help="Only U-Net steps and VAE decodes, no whole images."),
    no_diffusers: bool = typer.Option(False, "--no-diffusers", help="Time marble only."),
    no_bf16: bool = typer.Option(False, "--no-bf16", help="Skip marble's bf16 run and its PSNR against fp32."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Also lay marble's convolution weights out NHWC (an experiment; generate runs NCHW)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)."),
    tome: Optional[float] = typer.Option(None, "--tome", help="SD1.5 comparison: also make marble's fp32 and bf16 images with ToMe at this ratio (0..0.75): their time and PSNR against the exact fp32 image, beside diffusers in the same run."),
    deepcache: Optional[int] = typer.Option(None, "--deepcache", help="SD1.5 comparison: also make marble's images with DeepCache at this interval (2..100), as --tome (both may be given)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="SD1.5 comparison: 'int8': the fp32 image with --tome/--deepcache (or alone) runs on a second copy of the weights with dynamic int8 Linear layers (about 4.3 GB more memory; bf16 refuses int8)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers as JSON here (never overwritten)."),
    model: Optional[str] = typer.Option(None, "--model", help="Instead of the SD1.5 comparison, time this model "
                                        "(e.g. builtin) through the whole pipeline at its defaults: warm seconds per "
                                        "image and cold `marble generate` wall time."),
    runs: int = typer.Option(7, "--runs", help="With --model: timed warm images (median)."),
    cold_runs: int = typer.Option(3, "--cold-runs", help="With --model: timed cold CLI runs (median); 0 skips."),
    trace: bool = typer.Option(False, "--trace", help="With --model: also time the traced U-Net (`--trace`), "
                               "interleaved with the eager one."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="With --model: the compute dtype, as generate's "
                                        "--dtype (auto, fp32, bf16, fp16). Default fp32, so that runs compare "
                                        "across CPUs; auto times what generate runs on this one."),
) -> None:
    """Time Stable Diffusion 1.5's architecture (random weights from the config, no download):
    seconds per U-Net step, per VAE decode and per image, peak RSS, against diffusers' pipeline on
    the same weights in the same run, and marble's bf16 mode with its PSNR against fp32.

    Needs about 8 GB of memory; the full run takes several minutes per image on a laptop CPU.
    With --model NAME it times that model instead (`marble bench --model builtin`).
    """
    if json_out is not None and json_out.exists():
        fail(f"{json_out} exists; marble never overwrites a file")
    if low_memory and (arch != "sdxl" or model is not None):
        fail("--low-memory is an option of --arch sdxl")
    if dtype is not None and model is None:
        fail("--dtype is an option of --model (the SD1.5 comparison times fp32 and bf16 itself)")
    approximations = {k: v for k, v in (("tome", tome), ("deepcache", deepcache)) if v is not None}
    if (approximations or quantize is not None) and (model is not None or arch != "sd15"):
        fail("--tome, --deepcache and --quantize are options of the SD1.5 comparison")
    if quantize is not None and quantize != "int8":
        fail(f"--quantize must be int8, not {quantize!r}")
    if approximations:   # the request's ranges (checked before minutes of benchmarking), less the "off" values
        from marble.request import RequestError, check_approximations
        try:
            check_approximations(deepcache, tome)
        except RequestError as e:
            fail(f"--{e}")
        if tome == 0 or deepcache == 1:
            fail("--tome 0 and --deepcache 1 are off: they would time the exact image again")
    if model is not None:
        if runs < 1 or cold_runs < 0:
            fail("--runs must be >= 1 and --cold-runs >= 0")
        from marble.cli.compute import read_dtype
        from marble.errors import ModelLoadError
        from marble.eval.speed import measure

        compute = read_dtype(dtype or "fp32")
        try:
            speed = measure(model, runs=runs, cold_runs=cold_runs, threads=threads, trace=trace, dtype=compute)
        except ModelLoadError as e:
            fail(str(e))
        typer.echo(speed.markdown())
        if json_out is not None:
            from marble.fileio import write_new
            write_new(json_out, speed.to_json().encode("utf-8"))
        return
    if arch not in ("sd15", "sdxl"):
        fail(f"--arch must be sd15 or sdxl, not {arch!r}")
    size = size if size is not None else (1024 if arch == "sdxl" else 512)
    if size <= 0 or size % 8:
        fail(f"--size must be a positive multiple of 8, got {size}")
    if steps < 1 or unet_calls < 0:
        fail("--steps must be >= 1 and --unet-calls >= 0")
    if not no_diffusers:
        try:
            import diffusers  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            fail("diffusers and transformers are needed to compare (pip install diffusers transformers), "
                 "or pass --no-diffusers")
    if arch == "sdxl":
        sdxl_bench(size, weights, 1, not no_diffusers, threads, json_out, low_memory)   # one timed step and decode, after a warm-up
        return
    from marble.eval.sd_bench import BenchSettings, run_bench

    settings = BenchSettings(size=size, steps=2 if quick else steps, cfg=cfg, unet_calls=1 if quick else unet_calls,
                             decodes=1 if quick else 2, images=not no_images, diffusers=not no_diffusers,
                             bf16=not no_bf16, channels_last=channels_last, threads=threads,
                             approximations=approximations, quantize=quantize)
    report = run_bench(settings, log=info)
    typer.echo(report.markdown())
    if json_out is not None:
        from marble.fileio import write_new
        write_new(json_out, report.to_json().encode("utf-8"))


def sdxl_bench(size: int, weights: str, unet_calls: int, diffusers: bool, threads: int | None,
               json_out: Path | None, low_memory: bool = False) -> None:
    from marble.eval.sdxl_bench import SdxlBenchSettings, run_sdxl_bench
    from marble.models.weight_cast import STORAGE_DTYPES
    if weights not in STORAGE_DTYPES:
        fail(f"--weights must be one of {', '.join(STORAGE_DTYPES)}, not {weights!r}")
    settings = SdxlBenchSettings(size=size, weights=weights, unet_calls=max(1, unet_calls), threads=threads,
                                 low_memory=low_memory)
    try:
        report = run_sdxl_bench(settings, log=info, diffusers=diffusers)
    except RuntimeError as e:
        fail(str(e).splitlines()[-1] if str(e) else "the benchmark failed", code=1)
    typer.echo(report.markdown())
    if json_out is not None:
        from marble.fileio import write_new
        write_new(json_out, report.to_json().encode("utf-8"))
