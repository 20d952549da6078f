"""OpenAI's Images API: POST /v1/images/generations and POST /v1/images/edits.

Unknown fields are ignored (OpenAI's clients send many: quality, style, user, ...). marble's own
knobs ride along as extra fields, e.g. with the openai client's `extra_body={"seed": 7, "steps": 20}`.
Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so the client raises
its typed exceptions (BadRequestError, RateLimitError, ...).
"""
from __future__ import annotations

import re
import time
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from marble.request import GenerationRequest, RequestError
from marble.server.state import ServerState, state_of
from marble.server.images import open_image, to_base64
from marble.server.worker import JobResult

router = APIRouter(prefix="/v1", tags=["OpenAI Images API"])

_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(description="What to draw.")
    model: str | None = Field(None, description="A model's name or title from /sdapi/v1/sd-models (one of the models "
                                                "folder is loaded and becomes the default); default: the default model.")
    n: int | None = Field(None, description="Number of images, seeds seed..seed+n-1.")
    size: str | None = Field(None, description="WIDTHxHEIGHT, or 'auto' for the model's default.")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json (default) or url: a link to the file under this server's /outputs/.")
    output_format: str | None = Field(None, description="Only 'png'.")
    stream: bool | None = Field(None, description="Not supported; false or absent.")
    # marble's extensions (OpenAI's clients pass them with extra_body)
    negative_prompt: str | None = None
    seed: int | None = Field(None, description="-1 or absent: random; recorded in the PNG.")
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = Field(None, description="A sampler name, see /sdapi/v1/samplers.")
    spacing: str | None = Field(None, description="Sigma spacing (normal, karras, exponential, leading, trailing, "
                                                  "linspace, lcm). Default: the sampler's.")
    preset: str | None = Field(None, description="Few-step settings by name (sd-turbo, lcm-lora).")


class ImageGenerationParams(_Common):
    pass


class ImageEditParams(_Common):
    strength: float | None = Field(None, description="Fraction of the schedule to re-run, (0, 1]; "
                                                     "default 1 with a mask, 0.75 without.")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size.strip().lower() == "auto":
        return None, None
    m = _SIZE.match(size)
    if not m:
        raise RequestError(f"size must look like WIDTHxHEIGHT (e.g. 512x512) or 'auto', got {size[:40]!r}")
    return int(m.group(1)), int(m.group(2))


def _request(params: _Common, **images) -> GenerationRequest:
    if params.stream:
        raise RequestError("streaming is not supported: send stream=false")
    if params.output_format not in (None, "png"):
        raise RequestError(f"output_format {params.output_format!r} is not supported: marble returns PNG")
    width, height = parse_size(params.size)
    return GenerationRequest(
        prompt=params.prompt, negative_prompt=params.negative_prompt or "", seed=params.seed,
        steps=params.steps, sampler=params.sampler, cfg=params.cfg_scale, width=width, height=height,
        n=1 if params.n is None else params.n, spacing=params.spacing, preset=params.preset, **images)


async def _respond(state: ServerState, result: JobResult, response_format: str | None, request: Request) -> dict:
    data = []
    for path in result.paths:
        if response_format == "url":
            data.append({"url": f"{str(request.base_url).rstrip('/')}/outputs/{path.name}"})
        else:
            data.append({"b64_json": to_base64(await state.offload(path.read_bytes))})
    first = result.records[0]
    return {"created": int(time.time()), "data": data, "output_format": "png", "size": f"{first.width}x{first.height}"}


async def _generate(state: ServerState, params: _Common, request: Request, **images) -> dict:
    worker = await state.select(params.model)
    resolved = await state.prepare(worker, _request(params, **images))
    result = await state.run(worker, resolved, request)
    return await _respond(state, result, params.response_format, request)


@router.get("/models", summary="The models `model` may name: loaded ones, then the models folder (OpenAI API)")
async def models(request: Request) -> dict:
    state = state_of(request)
    names = list(state.workers) + [e.name for e in state.catalog.entries() if e.name not in state.workers]
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "marble"}
                                       for name in names]}


@router.post("/images/generations", summary="Create images from a prompt (OpenAI Images API)")
async def generations(params: ImageGenerationParams, request: Request) -> dict:
    return await _generate(state_of(request), params, request)


def edit_mask(image: Image.Image, mask: Image.Image | None) -> Image.Image | None:
    """OpenAI's convention to marble's: fully transparent pixels (alpha 0) of the mask, or of the
    image when no mask is sent, mark the area to edit; marble's mask is white where it repaints.
    None (edit the whole image, img2img) for an opaque image sent without a mask."""
    source = mask if mask is not None else image
    has_alpha = source.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in source.info
    if not has_alpha:
        if mask is not None:
            raise RequestError("the mask must be a PNG with an alpha channel: its fully transparent pixels "
                               "mark the area to edit")
        return None
    alpha = source.convert("RGBA").getchannel("A")
    repaint = alpha.point(lambda a: 255 if a == 0 else 0)
    if repaint.getbbox() is None:
        if mask is not None:
            raise RequestError("the mask has no fully transparent pixels: there is nothing to edit")
        return None
    return repaint


_EDIT_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "prompt"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "The image to edit (PNG)."},
        "mask": {"type": "string", "format": "binary",
                 "description": "PNG with alpha, same size: fully transparent pixels mark the area to edit. "
                                "Without it, the image's own transparent pixels do."},
        **{k: v for k, v in ImageEditParams.model_json_schema()["properties"].items()},
    }}}}}}


@router.post("/images/edits", summary="Edit an image where the mask is transparent (OpenAI Images API)",
             openapi_extra=_EDIT_SCHEMA)
async def edits(request: Request) -> dict:
    state = state_of(request)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise RequestError("send the image and mask as multipart/form-data (as the openai client does)")
    async with request.form(max_files=8, max_fields=64, max_part_size=state.limits.max_body_bytes) as form:
        uploads = form.getlist("image") + form.getlist("image[]")
        mask_upload = form.get("mask")
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str) and k not in ("image", "image[]", "mask")}
        if len(uploads) != 1 or not isinstance(uploads[0], UploadFile):
            raise RequestError("send exactly one image, as a file upload named 'image'")
        if mask_upload is not None and not isinstance(mask_upload, UploadFile):
            raise RequestError("the mask must be a file upload named 'mask'")
        image_bytes = await uploads[0].read()
        mask_bytes = await mask_upload.read() if mask_upload is not None else None
    try:
        params = ImageEditParams.model_validate(fields)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None

    image = await state.offload(open_image, image_bytes, "image", state.limits)
    mask = await state.offload(open_image, mask_bytes, "mask", state.limits) if mask_bytes is not None else None
    marble_mask = edit_mask(image, mask)
    return await _generate(state, params, request, init_image=image.convert("RGB"), mask=marble_mask,
                           strength=params.strength)
