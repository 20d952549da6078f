"""`marble generate`, `marble info`, `marble samplers`."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import typer
from PIL import Image, UnidentifiedImageError

from marble.cli.app import app, fail, warn

MODEL_HELP = ("Model: 'builtin' (default), 'tiny-random', a marble .safetensors file, a diffusers folder or an "
              "SD 1.x/2.x single file.")


def parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        fail(f"--size must look like WIDTHxHEIGHT (e.g. 64x64), got {size!r}")
    return w, h


def read_image(path: Path, what: str) -> tuple[Image.Image, str]:
    """The image and the sha256 of its file; one-line errors for missing or non-image files."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        fail(f"cannot read the {what} {path}: {e.strerror or e}")
    try:
        import io
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        fail(f"the {what} {path} is not a readable image")
    return image, hashlib.sha256(data).hexdigest()


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="What to draw. An empty string generates unconditionally. Optional with --from."),
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt: what to steer away from (replaces the empty prompt in CFG)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed in [0, 2^32-1]; image i uses seed+i. Default: random (recorded in the PNG)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps, 1..1000. Default: the model's."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance scale, 0..100 (1 = no guidance). Default: the model's."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Sampler name, see `marble samplers`. Default: the model's."),
    size: Optional[str] = typer.Option(None, "--size", help="WIDTHxHEIGHT in pixels, multiples of the model's latent factor. Default: the model's (or the init image's)."),
    n: int = typer.Option(1, "-n", "--n", help="Number of images (seeds seed..seed+n-1)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    out: Path = typer.Option(Path("outputs"), "--out", help="Output folder; files are numbered, never overwritten."),
    init_image: Optional[Path] = typer.Option(None, "--init-image", help="img2img: start from this image."),
    strength: Optional[float] = typer.Option(None, "--strength", help="img2img/inpaint: fraction of the schedule to re-run, (0, 1]. Default 0.75 (inpaint 1.0)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Inpainting mask, same size as --init-image; white = repaint, black = keep."),
    from_png: Optional[Path] = typer.Option(None, "--from", help="Regenerate from a marble PNG's record; other flags override its values."),
    prediction: Optional[str] = typer.Option(None, "--prediction", help="Override what the model predicts: eps | v | x0 (e.g. v for SD 2.x-768 files without a config)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow .ckpt/.pt models (tensors only, torch.load weights_only=True)."),
) -> None:
    """Generate images from a prompt (txt2img), an init image (img2img) or an image + mask (inpainting).

    Prints the paths of the PNG files it wrote. Each PNG carries A1111's `parameters` text and
    marble's full JSON record.
    """
    from marble.errors import ModelLoadError
    from marble.png import read_record, save_numbered
    from marble.request import GenerationRequest, RequestError

    init_sha = mask_sha = None
    if from_png is not None:
        try:
            rec = read_record(from_png)
        except ValueError as e:
            fail(str(e))
        prompt = rec.prompt if prompt is None else prompt
        negative = rec.negative_prompt if negative is None else negative
        seed = rec.seed if seed is None else seed
        steps = rec.steps if steps is None else steps
        cfg = rec.cfg if cfg is None else cfg
        sampler = rec.sampler if sampler is None else sampler
        size = f"{rec.width}x{rec.height}" if size is None else size
        strength = rec.strength if strength is None else strength
        model = rec.model_name if model is None else model
        if init_image is None and rec.init_image:
            init_image, init_sha = Path(rec.init_image), rec.init_image_sha256
        if mask is None and rec.mask:
            mask, mask_sha = Path(rec.mask), rec.mask_sha256
    if prompt is None:
        fail("a PROMPT is required (or --from PNG)")

    init = mask_image = None
    if init_image is not None:
        init, sha = read_image(init_image, "init image")
        if init_sha and sha != init_sha:
            fail(f"{init_image} has changed since the record was made (sha256 differs)")
        init_sha = sha
    if mask is not None:
        if init_image is None:
            fail("--mask needs --init-image")
        mask_image, sha = read_image(mask, "mask")
        if mask_sha and sha != mask_sha:
            fail(f"{mask} has changed since the record was made (sha256 differs)")
        mask_sha = sha
    width, height = parse_size(size) if size else (None, None)

    request = GenerationRequest(
        prompt=prompt, negative_prompt=negative or "", seed=seed, steps=steps, sampler=sampler, cfg=cfg,
        width=width, height=height, n=n, strength=strength, init_image=init, mask=mask_image,
        init_image_path=str(init_image) if init_image else None, init_image_sha256=init_sha,
        mask_path=str(mask) if mask else None, mask_sha256=mask_sha)

    from marble.pipeline import load_pipeline
    try:
        if prediction not in (None, "eps", "v", "x0"):
            fail(f"--prediction must be eps, v or x0, not {prediction!r}")
        pipe = load_pipeline(model, prediction=prediction, allow_pickle=allow_pickle)
        resolved = pipe.resolve(request)  # validate before any work
    except (ModelLoadError, RequestError) as e:
        fail(str(e))
    if from_png is not None and rec.model_hash and rec.model_hash != pipe.loaded.hash:
        warn(f"the record was made with model hash {rec.model_hash}, this model's is {pipe.loaded.hash}")
    if prompt == "":
        warn("empty prompt: generating unconditionally")

    from tqdm import tqdm
    bar = tqdm(total=None, unit="step", desc="sampling", leave=False)

    def progress(step: int, total: int, _x0) -> None:
        bar.total = total
        bar.update(1)

    try:
        result = pipe.generate(resolved, callback=progress)
    except Exception as e:  # the resolved request was valid: this is a bug or a resource limit
        bar.close()
        fail(f"generation failed: {type(e).__name__}: {e}", code=1)
    bar.close()
    for message in result.warnings:
        warn(message)
    for image, record in zip(result.images, result.records):
        typer.echo(str(save_numbered(image, record, out)))


@app.command()
def info(
    png: Path = typer.Argument(..., help="A PNG written by marble (or by A1111)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full JSON record instead of the A1111 text."),
) -> None:
    """Print the generation record stored in a PNG."""
    from marble.png import read_text_chunks
    from marble.record import GenerationRecord, parse_parameters

    try:
        chunks = read_text_chunks(png)
    except ValueError as e:
        fail(str(e))
    if "marble" in chunks:
        try:
            record = GenerationRecord.from_json(chunks["marble"])
        except (ValueError, TypeError) as e:
            fail(f"{png}: the marble record is malformed ({e})")
        typer.echo(json.dumps(json.loads(record.to_json()), indent=2, ensure_ascii=False) if as_json
                   else record.to_parameters())
    elif "parameters" in chunks:
        typer.echo(json.dumps(parse_parameters(chunks["parameters"]), indent=2, ensure_ascii=False) if as_json
                   else chunks["parameters"])
    else:
        fail(f"{png} carries no generation record")


@app.command()
def samplers() -> None:
    """List the samplers with their default steps and sigma spacing."""
    from marble.diffusion.samplers import SAMPLERS

    width = max(len(name) for name in SAMPLERS)
    for name, spec in SAMPLERS.items():
        typer.echo(f"{name:<{width}}  steps {spec.default_steps:<3} spacing {spec.spacing:<8} {spec.description}")
