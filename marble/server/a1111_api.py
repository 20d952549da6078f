"""The AUTOMATIC1111 web UI API, the subset its clients (e.g. `webuiapi`) use.

txt2img/img2img answer {images: [base64 PNG], parameters: <the request>, info: <JSON string with
seeds and infotexts>}. Fields A1111 has and marble does not (restore_faces, scripts, a separate
hires prompt, sampler or checkpoint, ...) are ignored, as A1111 ignores what its scripts do not
read. `denoising_strength` is img2img's strength, and in txt2img with `enable_hr` the hires pass's.
Prompts are read with A1111's syntax (weights, BREAK, editing; marble.prompts). Differences
from A1111:
  - the mask must have the init image's size (A1111 resizes it); mask_blur is not applied;
  - an interrupted job answers 200 with no images and `"interrupted": true` in info, since marble
    keeps no half-denoised images (A1111 returns them).
"""
from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from PIL import ImageOps
from pydantic import BaseModel, ConfigDict, Field

from marble import __version__
from marble.diffusion.samplers import SAMPLERS
from marble.hires import DEFAULT_DENOISE, IMAGE_UPSCALERS, LATENT_UPSCALERS, HiresFix
from marble.models.conditioning import MicroConditioning
from marble.record import parse_parameters
from marble.adapters.lora_folder import list_loras
from marble.request import GenerationRequest, RequestError, ResolvedRequest
from marble.server.control_units import parse_units
from marble.server.state import ServerState, state_of
from marble.server.images import base64_image, decode_base64, open_image, to_base64
from marble.server.worker import INTERRUPTED, Cancelled, JobResult

router = APIRouter(prefix="/sdapi/v1", tags=["A1111 API"])


class Txt2ImgParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str | None = Field("", description="null is taken as empty, as A1111 does.")
    negative_prompt: str | None = ""
    seed: int = Field(-1, description="-1: random. Image i of the request uses seed + i.")
    steps: int | None = Field(None, description="Default: the model's.")
    cfg_scale: float | None = Field(None, description="Default: the model's.")
    width: int | None = Field(None, description="Default: the model's (img2img: the init image's).")
    height: int | None = None
    sampler_name: str | None = None
    sampler_index: str | None = Field(None, description="Old name for sampler_name.")
    scheduler: str | None = Field(None, description="A1111 >= 1.9's schedule type: Automatic (the sampler's), "
                                                    "Uniform, Karras, Exponential, or a marble spacing name "
                                                    "(normal, leading, trailing, linspace, lcm).")
    preset: str | None = Field(None, description="marble: few-step settings by name (sd-turbo, lcm-lora); "
                                                 "fields given override them.")
    deepcache: int | None = Field(None, description="marble: approximation, the whole U-Net every N steps and "
                                                    "its deep features reused in between (DeepCache), 1..100; "
                                                    "1 = off (default).")
    tome: float | None = Field(None, description="marble: approximation, the fraction of tokens merged before "
                                                 "self-attention at the highest resolution (ToMe), 0..0.75; "
                                                 "0 = off (default).")
    vae_tile_size: int | None = Field(None, description="marble: encode and decode with the VAE in overlapping "
                                                        "tiles of this side, pixels (diffusers' enable_tiling; 512 is "
                                                        "its usual tile), a multiple of 4 latent cells; less memory "
                                                        "for large images, not the exact image. 0 = off (default).")
    regions: float | None = Field(None, description="marble: bind the prompt's colour phrases ('red circle') to the "
                                                    "regions of that colour in the first ControlNet unit's image (a "
                                                    "sketch in the built-in palette), by modulating cross-attention "
                                                    "(Dense Diffusion), this strong: 0..10, 0 = off (default).")
    batch_size: int = 1
    n_iter: int = 1
    denoising_strength: float | None = Field(
        None, description="img2img: fraction of the schedule to re-run; txt2img with enable_hr: the hires pass's "
                          "(default 0.7).")
    enable_hr: bool = Field(False, description="txt2img: hires fix, a second img2img pass at a larger size.")
    hr_scale: float = Field(2.0, description="Hires fix: upscale factor of width x height (when no hr_resize).")
    hr_upscaler: str | None = Field(None, description="Hires fix: Latent (default), Latent (bicubic), ..., Lanczos, "
                                                      "Nearest, None; see /sdapi/v1/upscalers.")
    hr_second_pass_steps: int = Field(0, description="Hires fix: steps of the second pass (0: steps).")
    hr_resize_x: int = Field(0, description="Hires fix: target width instead of hr_scale (0: from the height).")
    hr_resize_y: int = Field(0, description="Hires fix: target height instead of hr_scale (0: from the width).")
    override_settings: dict[str, Any] | None = Field(
        None, description="Read: sd_model_checkpoint (the model to use), emphasis (Original, No norm, None; "
                          "marble also takes ComfyUI), and for SDXL sdxl_crop_top, sdxl_crop_left (the crop "
                          "conditioning) and sdxl_refiner_high_aesthetic_score / sdxl_refiner_low_aesthetic_score "
                          "(a refiner's scores; 6 and 2.5 by default). Like A1111's settings, the SDXL ones apply "
                          "only where the model takes them.")
    send_images: bool = True
    alwayson_scripts: dict[str, Any] | None = Field(
        None, description="Read: controlnet.args, the sd-webui-controlnet extension's units (docs/controlnet.md).")


class Img2ImgParams(Txt2ImgParams):
    init_images: list[str] = Field(description="One base64 image (plain or a data: URL).")
    mask: str | None = Field(None, description="base64 image, same size as the init image; white = repaint.")
    inpainting_mask_invert: int = Field(0, description="1: repaint the black part instead.")
    include_init_images: bool = False


class PngInfoParams(BaseModel):
    image: str = Field(description="base64 PNG (plain or a data: URL).")


def _model_name(params: Txt2ImgParams) -> str | None:
    settings = params.override_settings or {}
    name = settings.get("sd_model_checkpoint")
    return name if isinstance(name, str) else None


def _count(params: Txt2ImgParams) -> int:
    # checked here because a product of two negatives would pass the request's own check on n
    if params.batch_size < 1 or params.n_iter < 1:
        raise RequestError(f"batch_size and n_iter must be >= 1, got {params.batch_size} and {params.n_iter}")
    if params.batch_size > 1000 or params.n_iter > 1000:
        raise RequestError("batch_size and n_iter must each be at most 1000")
    return params.batch_size * params.n_iter


def _hires(params: Txt2ImgParams) -> HiresFix | None:
    if not params.enable_hr:
        return None
    denoise = DEFAULT_DENOISE if params.denoising_strength is None else params.denoising_strength
    return HiresFix(scale=params.hr_scale, resize_x=params.hr_resize_x, resize_y=params.hr_resize_y,
                    steps=params.hr_second_pass_steps, denoise=denoise, upscaler=params.hr_upscaler)


def _request(params: Txt2ImgParams, micro_kinds: tuple[str, ...] = (), **images) -> GenerationRequest:
    return GenerationRequest(
        prompt=params.prompt or "", negative_prompt=params.negative_prompt or "", seed=params.seed, steps=params.steps,
        sampler=params.sampler_name or params.sampler_index, cfg=params.cfg_scale, width=params.width,
        height=params.height, n=_count(params), emphasis=_emphasis(params),
        spacing=_spacing(params.scheduler), preset=params.preset, micro=_micro(params, micro_kinds),
        deepcache=params.deepcache, tome=params.tome, vae_tile_size=params.vae_tile_size, regions=params.regions,
        **images)


def _spacing(scheduler: str | None) -> str | None:
    """A1111's schedule type as a marble spacing: Automatic is the sampler's own, Uniform is
    k-diffusion's model timesteps (marble's normal); other names are marble's (checked by resolve)."""
    name = (scheduler or "").strip().lower()
    return {"": None, "automatic": None, "uniform": "normal"}.get(name, name)


_MICRO_SETTINGS = {"sdxl_crop_top": "size", "sdxl_crop_left": "size", "sdxl_refiner_high_aesthetic_score": "aesthetic",
                   "sdxl_refiner_low_aesthetic_score": "aesthetic"}


def _micro(params: Txt2ImgParams, kinds: tuple[str, ...]) -> MicroConditioning:
    """A1111's SDXL settings in override_settings, for a model that takes them (A1111 reads them only
    for SDXL, and the scores only for a refiner); the request checks the values."""
    settings = params.override_settings or {}
    given = {k: settings[k] for k, kind in _MICRO_SETTINGS.items() if k in settings and kind in kinds}
    out = {}
    if "sdxl_crop_top" in given or "sdxl_crop_left" in given:
        out["crop_top_left"] = (given.get("sdxl_crop_top", 0), given.get("sdxl_crop_left", 0))
    if "sdxl_refiner_high_aesthetic_score" in given:
        out["aesthetic_score"] = given["sdxl_refiner_high_aesthetic_score"]
    if "sdxl_refiner_low_aesthetic_score" in given:
        out["negative_aesthetic_score"] = given["sdxl_refiner_low_aesthetic_score"]
    return MicroConditioning(**out)


def _emphasis(params: Txt2ImgParams) -> str | None:
    value = (params.override_settings or {}).get("emphasis")
    if value is not None and not isinstance(value, str):
        raise RequestError(f"override_settings.emphasis must be text, got {value!r}")
    return value


def _info(params: Txt2ImgParams, resolved: ResolvedRequest, result: JobResult | None, model: str,
          model_hash: str) -> dict:
    seeds = [r.seed for r in result.records] if result else []
    return {
        "prompt": resolved.prompt, "all_prompts": [resolved.prompt] * len(seeds),
        "negative_prompt": resolved.negative_prompt, "all_negative_prompts": [resolved.negative_prompt] * len(seeds),
        "seed": resolved.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": resolved.width, "height": resolved.height,
        "sampler_name": resolved.sampler, "cfg_scale": resolved.cfg, "steps": resolved.steps,
        "batch_size": params.batch_size, "n_iter": params.n_iter, "denoising_strength": resolved.hires.denoise if resolved.hires else resolved.strength,
        "sd_model_name": model, "sd_model_hash": model_hash,
        "infotexts": [r.to_parameters() for r in result.records] if result else [],
        "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"), "version": f"marble {__version__}",
        "warnings": result.warnings if result else [], "interrupted": result is None,
    }


async def _generate(state: ServerState, params: Txt2ImgParams, request: Request, echo: dict, **images) -> dict:
    worker = await state.select(_model_name(params))
    controls = await state.offload(parse_units, params.alwayson_scripts, state.limits, images.get("init_image"))
    resolved = await state.prepare(worker, _request(params, worker.pipe.defaults.micro, controls=controls, **images))
    try:
        result = await state.run(worker, resolved, request)
    except Cancelled as e:
        if e.reason != INTERRUPTED:
            raise
        result = None
    images_b64 = []
    if result is not None and params.send_images:
        images_b64 = [to_base64(await state.offload(p.read_bytes)) for p in result.paths]
    info = _info(params, resolved, result, worker.name, worker.pipe.loaded.hash)
    return {"images": images_b64, "parameters": echo, "info": json.dumps(info, ensure_ascii=False)}


@router.post("/txt2img", summary="Text to image (A1111)")
async def txt2img(params: Txt2ImgParams, request: Request) -> dict:
    return await _generate(state_of(request), params, request, params.model_dump(), hires=_hires(params))


@router.post("/img2img", summary="Image to image, and inpainting with a mask (A1111)")
async def img2img(params: Img2ImgParams, request: Request) -> dict:
    state = state_of(request)
    if len(params.init_images) != 1:
        raise RequestError(f"send exactly one init image (got {len(params.init_images)})")
    init = await state.offload(base64_image, params.init_images[0], "init image", state.limits)
    mask = None
    if params.mask:
        mask = (await state.offload(base64_image, params.mask, "mask", state.limits)).convert("L")
        if params.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
    echo = params.model_dump(exclude={"init_images", "mask"})
    echo.update(init_images=params.init_images if params.include_init_images else None, mask=None)
    return await _generate(state, params, request, echo, init_image=init.convert("RGB"), mask=mask,
                           strength=params.denoising_strength)


@router.get("/progress", summary="Progress of the running job, with a preview (A1111)")
async def progress(request: Request, skip_current_image: bool = False,
                   model: str | None = Query(None, description="Which model's worker; default: the first.")) -> dict:
    state = state_of(request)
    worker = state.worker(model)
    p = worker.progress(want_preview=not skip_current_image)
    return {
        "progress": p.fraction, "eta_relative": p.eta_seconds(time.monotonic()),
        "state": {"skipped": False, "interrupted": p.interrupted, "stopping_generation": False,
                  "job": p.job_id or "", "job_count": p.waiting + (p.job_id is not None), "job_timestamp": "",
                  "job_no": 0, "sampling_step": p.step, "sampling_steps": p.total},
        "current_image": None if skip_current_image or p.preview_png is None else to_base64(p.preview_png),
        "textinfo": None,
    }


@router.post("/interrupt", summary="Stop the running job(s); queued jobs go on (A1111)")
async def interrupt(request: Request) -> dict:
    for worker in state_of(request).workers.values():
        worker.interrupt()
    return {}


@router.get("/samplers", summary="Sampler names (A1111)")
async def samplers() -> list[dict]:
    return [{"name": name, "aliases": [], "options": {}} for name in SAMPLERS]


@router.get("/sd-models", summary="The models this server can use: loaded ones and its models folder (A1111)")
async def sd_models(request: Request) -> list[dict]:
    state = state_of(request)
    hashes = state.hashes()
    out = []
    for entry in state.catalog.entries():
        short = hashes.get(entry.name)
        out.append({"title": entry.title(short), "model_name": entry.name, "hash": short,
                    "sha256": state.catalog.sha256(entry) if short else None, "filename": str(entry.path),
                    "config": None})
    listed = {m["model_name"] for m in out}
    for name, short in hashes.items():   # loaded from outside the folder (--model PATH, built-in names)
        if name not in listed:
            out.append({"title": f"{name} [{short}]", "model_name": name, "hash": short, "sha256": None,
                        "filename": name, "config": None})
    return out


def _title(state: ServerState, name: str) -> str:
    entry = state.catalog.find(name)
    short = state.workers[name].pipe.loaded.hash
    return entry.title(short) if entry is not None and entry.name == name else f"{name} [{short}]"


@router.get("/options", summary="The settings marble has: the model being served (A1111)")
async def get_options(request: Request) -> dict:
    state = state_of(request)
    entry = state.catalog.find(state.default)
    sha = state.catalog.sha256(entry) if entry is not None else None
    return {"sd_model_checkpoint": _title(state, state.default), "sd_checkpoint_hash": sha}


@router.post("/options", summary="Switch the served model with sd_model_checkpoint (A1111); other settings are "
                                 "ignored")
async def set_options(options: dict[str, Any], request: Request) -> None:
    name = options.get("sd_model_checkpoint")
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise RequestError("sd_model_checkpoint must be a model's name or title")
    state = state_of(request)
    worker = await state.select(name)   # loaded first when it is only in the models folder
    state.default = worker.name
    return None


@router.get("/upscalers", summary="Image upscalers marble can run for the hires fix (A1111)")
async def upscalers() -> list[dict]:
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in IMAGE_UPSCALERS]


@router.get("/latent-upscale-modes", summary="Latent upscale modes for the hires fix (A1111)")
async def latent_upscale_modes() -> list[dict]:
    return [{"name": name} for name in LATENT_UPSCALERS]


@router.get("/loras", summary="The LoRA folder: what <lora:NAME:WEIGHT> tags can name (A1111)")
async def loras(request: Request) -> list[dict]:
    state = state_of(request)
    return await state.offload(list_loras, state.worker(None).pipe.loras.folder)


@router.post("/refresh-loras", summary="Re-read the LoRA folder (A1111); marble lists it live", include_in_schema=False)
async def refresh_loras() -> dict:
    return {}


@router.get("/scripts", summary="Scripts (A1111): marble has none", include_in_schema=False)
async def scripts() -> dict:
    return {"txt2img": [], "img2img": []}


def _png_text(data: bytes, limits) -> dict[str, str]:
    image = open_image(data, "image", limits)  # size-checked, then fully read: some text chunks follow the pixels
    return {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}


@router.post("/png-info", summary="The generation parameters stored in a PNG (A1111)")
async def png_info(params: PngInfoParams, request: Request) -> dict:
    if not params.image.strip():
        return {"info": "", "items": {}, "parameters": {}}
    state = state_of(request)
    text = await state.offload(_png_text, decode_base64(params.image, "image"), state.limits)
    info = text.pop("parameters", "")
    return {"info": info, "items": text, "parameters": parse_parameters(info) if info else {}}
