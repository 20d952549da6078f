"""`marble generate`, `marble info`, `marble samplers`."""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from PIL import Image, UnidentifiedImageError

from marble.cli.app import app, fail, warn
from marble.cli.compute import apply_threads, dtype_option, read_dtype, threads_option

if TYPE_CHECKING:  # imported where used: `marble --help` should not load torch
    from marble.pipeline import Pipeline
    from marble.record import GenerationRecord
    from marble.request import GenerationRequest, ResolvedRequest

DEFAULT_TILE = 512   # --vae-tiling's tile, pixels (marble.models.vae_tiling.DEFAULT_TILE; not imported: no torch for --help)

MODEL_HELP = ("Model: 'builtin' (default), 'tiny-random', a marble .safetensors file, a diffusers folder or an "
              "SD 1.x/2.x single file.")


def parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        fail(f"--size must look like WIDTHxHEIGHT (e.g. 64x64), got {size!r}")
    return w, h


def read_image(path: Path, what: str, expected_sha: str | None = None) -> tuple[Image.Image, str]:
    """The image and the sha256 of its file; one-line errors for missing or non-image files, and for
    a file that no longer matches the hash its record gives (`expected_sha`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        fail(f"cannot read the {what} {path}: {e.strerror or e}")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        fail(f"the {what} {path} is not a readable image")
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha and sha != expected_sha:
        fail(f"{path} has changed since the record was made (sha256 differs)")
    return image, sha


@dataclass(frozen=True)
class Flags:
    """What `generate` was asked for, None where a flag was not given (the model's default)."""
    prompt: str | None
    negative: str | None
    seed: int | None
    steps: int | None
    cfg: float | None
    sampler: str | None
    size: str | None
    strength: float | None
    model: str | None
    init_image: Path | None
    mask: Path | None
    init_sha: str | None = None     # with --from: the sha256 the record gives for each image
    mask_sha: str | None = None
    loras: tuple | None = None      # LoraSpecs from --lora PATH[:WEIGHT] (or a record's); tags stay in the prompt
    hires_scale: float | None = None    # any hires flag asks for the hires fix
    hires_resize: str | None = None
    hires_steps: int | None = None
    hires_denoise: float | None = None
    hires_upscaler: str | None = None
    emphasis: str | None = None
    spacing: str | None = None
    preset: str | None = None
    controls: tuple | None = None       # ControlFlags per --control image (marble.cli.control)
    micro: dict | None = None       # SDXL micro-conditioning flags given (MicroConditioning.given() layout)
    deepcache: int | None = None    # approximations (docs/bench.md): DeepCache interval, ToMe ratio, quantisation
    tome: float | None = None
    quantize: str | None = None
    vae_tile_size: int | None = None    # VAE tiling: tile side in pixels, 0 = off
    regions: float | None = None    # colour phrases bound to the first control image's colours (marble.adapters.regions)

    @property
    def hires(self) -> bool:
        return any(v is not None for v in (self.hires_scale, self.hires_resize, self.hires_steps,
                                           self.hires_denoise, self.hires_upscaler))


_FROM_RECORD = {"prompt": "prompt", "negative": "negative_prompt", "seed": "seed", "steps": "steps", "cfg": "cfg",
                "sampler": "sampler", "strength": "strength", "model": "model_name",
                "emphasis": "emphasis", "spacing": "spacing", "deepcache": "deepcache", "tome": "tome",
                "quantize": "quantize", "vae_tile_size": "vae_tile_size", "regions": "regions"}   # flag -> record field


def merge_record(flags: Flags, record: GenerationRecord) -> Flags:
    """--from: the record's value for every flag not given. Its images are taken with their hashes,
    so that reading them checks they did not change."""
    merged = {flag: getattr(record, key) for flag, key in _FROM_RECORD.items() if getattr(flags, flag) is None}
    if not record.model_name:      # read from A1111's text: its model is not one of ours; --model or the default
        merged.pop("model", None)
    if flags.size is None:
        merged["size"] = f"{record.width}x{record.height}"
    if flags.init_image is None and record.init_image:
        merged.update(init_image=Path(record.init_image), init_sha=record.init_image_sha256)
    if flags.mask is None and record.mask:
        merged.update(mask=Path(record.mask), mask_sha=record.mask_sha256)
    if record.hires_upscaler is not None:
        resize = f"{record.hires_resize_x}x{record.hires_resize_y}" \
            if record.hires_resize_x or record.hires_resize_y else None
        ours = {"hires_scale": None if resize else record.hires_scale, "hires_resize": resize,
                "hires_steps": record.hires_steps, "hires_denoise": record.hires_denoise,
                "hires_upscaler": record.hires_upscaler}
        given_size = flags.hires_scale is not None or flags.hires_resize is not None
        merged.update({k: v for k, v in ours.items() if getattr(flags, k) is None
                       and not (given_size and k in ("hires_scale", "hires_resize"))})
    if record.controlnets:
        from marble.cli.control import merge_record_controls
        merged["controls"] = merge_record_controls(flags.controls, record.controlnets)
    if record.micro:   # flags given win, field by field
        merged["micro"] = {**record.micro, **(flags.micro or {})}
    if flags.loras is None and any("path" in e for e in record.loras):
        from marble.adapters.lora_loader import LoraSpec
        merged["loras"] = tuple(LoraSpec(e["path"], e["te"], e["unet"], is_path=True) for e in record.loras
                                if "path" in e)
    return replace(flags, **merged)


def read_hires(flags: Flags):
    """The hires fix the flags ask for (A1111's defaults for the rest), or None."""
    from marble.hires import DEFAULT_DENOISE, HiresFix
    if not flags.hires:
        return None
    resize_x, resize_y = 0, 0
    if flags.hires_resize is not None:
        try:
            resize_x, resize_y = (int(v) for v in flags.hires_resize.lower().split("x"))
        except ValueError:
            fail(f"--hires-resize must look like WIDTHxHEIGHT (0 for a side keeps the aspect ratio), "
                 f"got {flags.hires_resize!r}")
    return HiresFix(scale=2.0 if flags.hires_scale is None else flags.hires_scale, resize_x=resize_x,
                    resize_y=resize_y, steps=flags.hires_steps or 0,
                    denoise=DEFAULT_DENOISE if flags.hires_denoise is None else flags.hires_denoise,
                    upscaler=flags.hires_upscaler)


def parse_micro(values: dict[str, str | float | None]) -> dict | None:
    """The SDXL micro-conditioning flags given: sizes WIDTHxHEIGHT, crops TOP,LEFT, scores numbers."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        if key.endswith("aesthetic_score"):
            out[key] = value
            continue
        sep, shape = (",", "TOP,LEFT") if "crop" in key else ("x", "WIDTHxHEIGHT")
        try:
            a, b = (int(v) for v in value.lower().split(sep))
        except ValueError:
            fail(f"--{key.replace('_', '-')} must look like {shape}, got {value!r}")
        out[key] = [a, b]
    return out or None


def parse_loras(values: list[str] | None) -> tuple | None:
    """--lora PATH[:WEIGHT], repeatable -> LoraSpecs (the weight applies to text encoder and U-Net)."""
    if not values:
        return None
    from marble.adapters.lora_folder import parse_lora_arg
    from marble.adapters.lora_loader import LoraSpec
    from marble.errors import LoraError
    specs = []
    for value in values:
        try:
            path, weight = parse_lora_arg(value)
        except LoraError as e:
            fail(str(e))
        specs.append(LoraSpec(path, weight, weight, is_path=True))
    return tuple(specs)


def read_request(flags: Flags, n: int) -> GenerationRequest:
    """The request the flags describe, with its images read; not yet resolved against a model."""
    from marble.cli.control import read_controls
    from marble.request import GenerationRequest
    if flags.prompt is None:
        fail("a PROMPT is required (or --from PNG)")
    init = mask = init_sha = mask_sha = None
    if flags.init_image is not None:
        init, init_sha = read_image(flags.init_image, "init image", flags.init_sha)
    if flags.mask is not None:
        if flags.init_image is None:
            fail("--mask needs --init-image")
        mask, mask_sha = read_image(flags.mask, "mask", flags.mask_sha)
    width, height = parse_size(flags.size) if flags.size else (None, None)
    return GenerationRequest(
        prompt=flags.prompt, negative_prompt=flags.negative or "", seed=flags.seed, steps=flags.steps,
        sampler=flags.sampler, cfg=flags.cfg, width=width, height=height, n=n, strength=flags.strength,
        init_image=init, mask=mask, init_image_path=str(flags.init_image) if flags.init_image else None,
        init_image_sha256=init_sha, mask_path=str(flags.mask) if flags.mask else None, mask_sha256=mask_sha,
        hires=read_hires(flags), emphasis=flags.emphasis, loras=flags.loras or (), spacing=flags.spacing,
        preset=flags.preset, deepcache=flags.deepcache, tome=flags.tome, vae_tile_size=flags.vae_tile_size,
        controls=read_controls(flags.controls, read_image), micro=read_micro(flags), regions=flags.regions)


def read_micro(flags: Flags):
    from marble.models.conditioning import MicroConditioning
    try:
        return MicroConditioning.from_given(flags.micro or {})
    except ValueError as e:
        fail(str(e))


def load_resolved(request: GenerationRequest, model: str | None, prediction: str | None,
                  allow_pickle: bool, lora_dir: Path | None = None, lora_lenient: bool = False,
                  refiner: str | None = None, refiner_switch: float = 0.8,
                  decoder: Path | None = None, dtype=None, control_dir: Path | None = None,
                  max_pixels: int | None = None, weights: str | None = None,
                  quantize: str | None = None, mapped: bool = False) -> tuple[Pipeline, ResolvedRequest]:
    """Load the model (and a refiner) and resolve the request against it, its LoRAs read: every
    error before any work."""
    from marble.errors import ModelLoadError
    from marble.pipeline import load_pipeline
    from marble.request import RequestError, resolve
    if prediction not in (None, "eps", "v", "x0"):
        fail(f"--prediction must be eps, v or x0, not {prediction!r}")
    storage = read_weights(weights)
    if max_pixels is not None and max_pixels < 1:
        fail(f"--max-pixels must be >= 1, got {max_pixels}")
    try:
        pipe = load_pipeline(model, prediction=prediction, allow_pickle=allow_pickle, lora_dir=lora_dir,
                             lora_lenient=lora_lenient, refiner=refiner, refiner_switch=refiner_switch,
                             decoder=decoder, control_dir=control_dir, storage=storage, quantize=quantize,
                             mapped=mapped, **({} if dtype is None else {"dtype": dtype}))
        if mapped:
            check_mapped(pipe)
        defaults = pipe.defaults if max_pixels is None else replace(pipe.defaults, max_pixels=max_pixels)
        resolved = resolve(request, defaults)
        pipe.lora_uses(resolved)   # read and checked now (LoraError is a ModelLoadError); cached for generate
        pipe.control_nets(resolved)   # ControlNets too: a file for another architecture fails here
        return pipe, resolved
    except (ModelLoadError, RequestError) as e:
        fail(str(e))


def check_mapped(pipe: Pipeline) -> None:
    """--low-memory maps only the tensors a .safetensors file stores in the dtype they are kept in:
    one line when that is none of them (an fp16 file without --weights fp16: every tensor widened)."""
    from marble.tensor_file import mapped_bytes
    if mapped_bytes(pipe.model.parameters()) == 0:
        warn(f"--low-memory: none of {pipe.name}'s weights are mapped (they are cast or not in a .safetensors "
             "file); for an fp16 file, add --weights fp16")


def read_quantize(name: str | None) -> str | None:
    """--quantize int8 (or none/off): exit 2 for anything else."""
    from marble.models.quantize import check_quantization
    try:
        return check_quantization(name)
    except ValueError as e:
        fail(str(e))


def read_weights(weights: str | None):
    """--weights fp16|bf16|fp32 -> the storage dtype (None: as the model computes, float32)."""
    if weights is None:
        return None
    from marble.models.weight_cast import storage_dtype
    try:
        return storage_dtype(weights)
    except ValueError as e:
        fail(f"--{e}")


def recorded_refiner(record: GenerationRecord | None, refiner: str | None,
                     switch: float | None) -> tuple[str | None, float]:
    """--from: the record's refiner (by the path it was loaded from) and switch where no --refiner /
    --refiner-switch is given; one line if the record names a refiner that cannot be found."""
    if record is not None and record.refiner:
        if refiner is None:
            refiner = record.refiner_path
            if not refiner or not Path(refiner).exists():
                fail(f"the record names the refiner {record.refiner} [{record.refiner_hash}]"
                     f"{f' at {refiner}' if refiner else ''}, which is not there; pass --refiner PATH")
        if switch is None:
            switch = record.refiner_switch
    if refiner is None and switch is not None:
        fail("--refiner-switch needs --refiner (the model that takes over)")
    return refiner, 0.8 if switch is None else switch


def run_and_save(pipe: Pipeline, request: ResolvedRequest, out: Path) -> None:
    """Generate with a progress bar, then save each image and print its path."""
    from tqdm import tqdm

    from marble.png import save_numbered
    bar = tqdm(total=None, unit="step", desc="sampling", leave=False)

    def progress(step: int, total: int, _x0) -> None:
        bar.total = total
        bar.update(1)

    try:
        result = pipe.generate(request, callback=progress)
    except Exception as e:  # the resolved request was valid: this is a bug or a resource limit
        bar.close()
        fail(f"generation failed: {type(e).__name__}: {e}", code=1)
    bar.close()
    for message in result.warnings:
        warn(message)
    for image, record in zip(result.images, result.records):
        typer.echo(str(save_numbered(image, record, out)))


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="What to draw. An empty string generates unconditionally. Optional with --from."),
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt: what to steer away from (replaces the empty prompt in CFG)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed in [0, 2^32-1]; image i uses seed+i. Default: random (recorded in the PNG)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps, 1..1000. Default: the model's."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance scale, 0..100 (1 = no guidance). Default: the model's."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Sampler name, see `marble samplers`. Default: the model's."),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="Sigma spacing: normal, karras, exponential, leading, trailing, linspace or lcm (diffusers' timestep_spacing names). Default: the sampler's (a few-step model's: its card's)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Few-step settings by name: sd-turbo (Euler a, trailing, 1 step, CFG 1) or lcm-lora (LCM, lcm spacing, 4 steps, CFG 1); flags given override them. See docs/few-step.md."),
    size: Optional[str] = typer.Option(None, "--size", help="WIDTHxHEIGHT in pixels, multiples of the model's latent factor. Default: the model's (or the init image's)."),
    n: int = typer.Option(1, "-n", "--n", help="Number of images (seeds seed..seed+n-1)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    out: Path = typer.Option(Path("outputs"), "--out", help="Output folder; files are numbered, never overwritten."),
    init_image: Optional[Path] = typer.Option(None, "--init-image", help="img2img: start from this image."),
    strength: Optional[float] = typer.Option(None, "--strength", help="img2img/inpaint: fraction of the schedule to re-run, (0, 1]. Default 0.75 (inpaint 1.0)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Inpainting mask, same size as --init-image; white = repaint, black = keep."),
    hires_scale: Optional[float] = typer.Option(None, "--hires-scale", help="Hires fix: generate at --size, upscale by this factor (1..8, default 2), then img2img at the larger size. Any --hires-* flag turns it on."),
    hires_resize: Optional[str] = typer.Option(None, "--hires-resize", help="Hires fix: upscale to WIDTHxHEIGHT instead (0 for one side keeps the aspect ratio; both: cover and crop the centre)."),
    hires_steps: Optional[int] = typer.Option(None, "--hires-steps", help="Hires fix: steps of the second pass's schedule (default: --steps)."),
    hires_denoise: Optional[float] = typer.Option(None, "--hires-denoise", help="Hires fix: fraction of the second pass's schedule to run, (0, 1] (default 0.7)."),
    hires_upscaler: Optional[str] = typer.Option(None, "--hires-upscaler", help="Hires fix: latent (default; also 'Latent (bicubic)', ...), lanczos or nearest. See docs/prompts.md."),
    emphasis: Optional[str] = typer.Option(None, "--emphasis", help="How (word:1.3) weights act: a1111 (default: scale, keep the mean), no-norm, comfy (ComfyUI's lerp from the empty prompt) or none (brackets are text)."),
    from_png: Optional[Path] = typer.Option(None, "--from", help="Regenerate from a marble PNG's record; other flags override its values."),
    prediction: Optional[str] = typer.Option(None, "--prediction", help="Override what the model predicts: eps | v | x0 (e.g. v for SD 2.x-768 files without a config)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow .ckpt/.pt models (tensors only, torch.load weights_only=True)."),
    lora: Optional[list[str]] = typer.Option(None, "--lora", help="Apply a LoRA file: PATH[:WEIGHT] (weight 1 by default). Repeatable. In the prompt, <lora:NAME:WEIGHT> (or <lora:NAME:TE:UNET>) applies NAME from --lora-dir."),
    lora_dir: Optional[Path] = typer.Option(None, "--lora-dir", help="Folder where <lora:NAME> tags are looked up (names never resolve outside it). Default: $MARBLE_LORA_DIR, else models/lora."),
    lora_lenient: bool = typer.Option(False, "--lora-lenient", help="Skip (with a warning) the layers of a LoRA file this model lacks, instead of refusing the file."),
    refiner: Optional[str] = typer.Option(None, "--refiner", help="A refiner model (SDXL refiner) that takes over the end of the schedule and decodes."),
    decoder: Optional[Path] = typer.Option(None, "--decoder", help="A TAESD file (diffusers AutoencoderTiny or taesd_decoder.safetensors) that decodes the image instead of the VAE: faster, softer. See docs/few-step.md."),
    refiner_switch: Optional[float] = typer.Option(None, "--refiner-switch", help="Fraction of the schedule the base runs before the refiner takes over, (0, 1) (diffusers' denoising_end). Default 0.8."),
    threads: int = threads_option(),
    dtype: str = dtype_option(),
    control: Optional[list[Path]] = typer.Option(None, "--control", help="ControlNet: a control image (edges, sketch, ...). Repeatable; each takes the i-th of every --control-* flag (docs/controlnet.md)."),
    control_model: Optional[list[str]] = typer.Option(None, "--control-model", help="ControlNet: its file or folder (lllyasviel, diffusers or marble), or a name in --control-dir."),
    control_module: Optional[list[str]] = typer.Option(None, "--control-module", help="ControlNet: preprocessor none (default), canny, invert, threshold, scribble or seg."),
    control_weight: Optional[list[float]] = typer.Option(None, "--control-weight", help="ControlNet: weight (conditioning scale), 0..2 (default 1)."),
    control_start: Optional[list[float]] = typer.Option(None, "--control-start", help="ControlNet: fraction of the steps where it starts acting, 0..1 (default 0)."),
    control_end: Optional[list[float]] = typer.Option(None, "--control-end", help="ControlNet: fraction of the steps where it stops, 0..1 (default 1)."),
    control_mode: Optional[list[str]] = typer.Option(None, "--control-mode", help="ControlNet: 'Balanced' (default), 'My prompt is more important' or 'ControlNet is more important' (or 0, 1, 2)."),
    control_resize: Optional[list[str]] = typer.Option(None, "--control-resize", help="ControlNet: how the control image fits the size: 'Just Resize', 'Crop and Resize' (default), 'Resize and Fill'."),
    control_processor_res: Optional[list[int]] = typer.Option(None, "--control-processor-res", help="ControlNet: the preprocessor's resolution, the image's short side in px for canny, threshold and scribble, 64..2048 (default 512; -1: the default)."),
    control_pixel_perfect: Optional[list[str]] = typer.Option(None, "--control-pixel-perfect", help="ControlNet: on/off (default off); on: the preprocessor's resolution from the image and output sizes, as sd-webui-controlnet's pixel perfect."),
    control_dir: Optional[Path] = typer.Option(None, "--control-dir", help="Folder where ControlNet names are looked up. Default: $MARBLE_CONTROLNET_DIR, else models/controlnet."),
    weights: Optional[str] = typer.Option(None, "--weights", envvar="MARBLE_WEIGHTS", help="Keep the weights in fp16 or bf16 (half the memory) and compute in float32 (exactly a float32 model with rounded weights); fp32 (default) keeps them as computed. Also $MARBLE_WEIGHTS."),
    low_memory: bool = typer.Option(False, "--low-memory", envvar="MARBLE_LOW_MEMORY", help="Keep the weights that a .safetensors model stores in the dtype they are kept in (an fp16 file with --weights fp16) as read-only views of the file's memory map, and hand each network's pages back to the kernel when its stage ends (the U-Net's before the VAE decode): lower peak memory, the same pixels (not recorded: it cannot change them), a page re-read from the page cache per use. The file must not be rewritten in place while marble runs. docs/bench.md. Also $MARBLE_LOW_MEMORY."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", envvar="MARBLE_MAX_PIXELS", help="Largest width·height to accept (default: the model's, 2048² for SD and SDXL). Also $MARBLE_MAX_PIXELS."),
    original_size: Optional[str] = typer.Option(None, "--original-size", help="SDXL: WIDTHxHEIGHT the image is conditioned as coming from (default: --size)."),
    crop_top_left: Optional[str] = typer.Option(None, "--crop-top-left", help="SDXL: TOP,LEFT of the crop it is conditioned as being (default 0,0)."),
    target_size: Optional[str] = typer.Option(None, "--target-size", help="SDXL base: WIDTHxHEIGHT conditioned as asked for (default: --size)."),
    negative_original_size: Optional[str] = typer.Option(None, "--negative-original-size", help="SDXL: --original-size of the negative prompt (default: the prompt's)."),
    negative_crop_top_left: Optional[str] = typer.Option(None, "--negative-crop-top-left", help="SDXL: --crop-top-left of the negative prompt (default: the prompt's)."),
    negative_target_size: Optional[str] = typer.Option(None, "--negative-target-size", help="SDXL base: --target-size of the negative prompt (default: the prompt's)."),
    deepcache: Optional[int] = typer.Option(None, "--deepcache", help="Approximation: run the whole U-Net every N steps and reuse its deep features in between (DeepCache), 1..100; 1 = off (default). Faster, not the exact image: docs/bench.md gives its cost."),
    tome: Optional[float] = typer.Option(None, "--tome", help="Approximation: merge this fraction of the tokens before self-attention in the highest-resolution transformers (ToMe for SD), 0..0.75; 0 = off (default). docs/bench.md gives its cost."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Approximation: 'int8' runs the U-Net transformers' Linear layers in dynamic int8 (float32 models only; not with LoRAs). Default: off. docs/bench.md gives its cost."),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="Encode and decode with the VAE in overlapping 512-pixel tiles, one at a time (diffusers' enable_tiling): the VAE's memory follows the tile, not the image (SDXL at 1024²). Not the exact image: each tile normalises on its own and the seams are cross-faded. Images within one tile are unchanged. Recorded. docs/bench.md."),
    vae_tile_size: Optional[int] = typer.Option(None, "--vae-tile-size", help="VAE tiling with tiles of this side in pixels, a multiple of 4 latent cells (32 px for SD); 0 = off. Implies --vae-tiling."),
    regions: Optional[float] = typer.Option(None, "--regions", help="Bind the prompt's colour phrases ('red circle') to the regions of that colour in the first --control image (a sketch in the built-in palette, as the web UI's pad draws), by modulating cross-attention (Dense Diffusion), this strong: 0..10, 0 = off (default). Recorded. docs/controlnet-training.md."),
    aesthetic_score: Optional[float] = typer.Option(None, "--aesthetic-score", help="SDXL refiner: aesthetic score of the prompt, 0..10 (default 6)."),
    negative_aesthetic_score: Optional[float] = typer.Option(None, "--negative-aesthetic-score", help="SDXL refiner: aesthetic score of the negative prompt, 0..10 (default 2.5)."),
) -> None:
    """Generate images from a prompt (txt2img), an init image (img2img) or an image + mask (inpainting).

    Prompts read as A1111 reads them: (word:1.3) weights, [word], BREAK, [from:to:when] and [a|b]
    editing, any length (docs/prompts.md). Prints the paths of the PNG files it wrote. Each PNG carries A1111's `parameters` text and
    marble's full JSON record.
    """
    from marble.cli.control import control_flags
    from marble.png import read_record

    flags = Flags(prompt, negative, seed, steps, cfg, sampler, size, strength, model, init_image, mask,
                  hires_scale=hires_scale, hires_resize=hires_resize, hires_steps=hires_steps,
                  hires_denoise=hires_denoise, hires_upscaler=hires_upscaler, emphasis=emphasis,
                  loras=parse_loras(lora), spacing=spacing, preset=preset, deepcache=deepcache, tome=tome, regions=regions,
                  quantize=quantize, vae_tile_size=vae_tile_size if vae_tile_size is not None else
                  DEFAULT_TILE if vae_tiling else None,   # None: off, or the record's with --from
                  controls=control_flags(control, model=control_model, module=control_module, weight=control_weight,
                                         start=control_start, end=control_end, mode=control_mode,
                                         resize=control_resize, processor_res=control_processor_res,
                                         pixel_perfect=control_pixel_perfect),
                  micro=parse_micro(dict(original_size=original_size, crop_top_left=crop_top_left,
                                         target_size=target_size, negative_original_size=negative_original_size,
                                         negative_crop_top_left=negative_crop_top_left,
                                         negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
                                         negative_aesthetic_score=negative_aesthetic_score)))
    record = None
    if from_png is not None:
        try:
            record = read_record(from_png)
        except ValueError as e:
            fail(str(e))
        flags = merge_record(flags, record)
    refiner, refiner_switch = recorded_refiner(record, refiner, refiner_switch)
    request = read_request(flags, n)
    # int8 kernels take float32 activations: auto means fp32 with --quantize
    compute_dtype = read_dtype("fp32" if dtype == "auto" and read_quantize(flags.quantize) else dtype)
    apply_threads(threads)
    pipe, resolved = load_resolved(request, flags.model, prediction, allow_pickle, lora_dir, lora_lenient,
                                   refiner, refiner_switch, decoder, compute_dtype, control_dir, max_pixels, weights,
                                   read_quantize(flags.quantize), low_memory)
    if record is not None and record.model_hash and record.model_hash != pipe.loaded.hash:
        warn(f"the record was made with model hash {record.model_hash}, this model's is {pipe.loaded.hash}")
    if record is not None and record.refiner_hash and pipe.refiner is not None \
            and record.refiner_hash != pipe.refiner.hash:
        warn(f"the record was made with refiner hash {record.refiner_hash}, this refiner's is {pipe.refiner.hash}")
    if record is not None:
        recorded = {e["name"]: e["hash"] for e in record.loras}
        for use in pipe.lora_uses(resolved):
            if recorded.get(use.lora.name, use.lora.hash) != use.lora.hash:
                warn(f"the record was made with LoRA {use.lora.name} hash {recorded[use.lora.name]}, "
                     f"this file's is {use.lora.hash}")
        for unit, loaded in zip(record.controlnets, pipe.control_nets(resolved)):
            if unit["hash"] != loaded.hash:
                warn(f"the record was made with ControlNet {unit['model']} hash {unit['hash']}, "
                     f"this file's ({loaded.name}) is {loaded.hash}")
    if resolved.prompt == "":
        warn("empty prompt: generating unconditionally")
    run_and_save(pipe, resolved, out)


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
    """List the samplers with their default steps and sigma spacing, then the spacings and the
    few-step presets (--spacing, --preset)."""
    from marble.diffusion.few_step import PRESETS
    from marble.diffusion.samplers import SAMPLERS
    from marble.diffusion.schedule import SPACINGS

    width = max(len(name) for name in SAMPLERS)
    for name, spec in SAMPLERS.items():
        typer.echo(f"{name:<{width}}  steps {spec.default_steps:<3} spacing {spec.spacing:<8} {spec.description}")
    typer.echo(f"\nspacings (--spacing): {', '.join(SPACINGS)}")
    typer.echo("presets (--preset):")
    for name, settings in PRESETS.items():
        typer.echo(f"  {name:<9} {settings.describe()}")
