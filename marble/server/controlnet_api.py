"""The sd-webui-controlnet extension's own routes: the ControlNet folder's models, the preprocessors,
and running a preprocessor. Units inside txt2img/img2img requests: marble.server.control_units."""
from __future__ import annotations

import io

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, field_validator

from marble.adapters.controlnet import list_controlnets
from marble.adapters.preprocess import MODULES, NEED_WEIGHTS, PROCESSOR_RES, PROCESSOR_RES_RANGE, preprocess
from marble.checkpoints.checkpoint import file_hash
from marble.request import RequestError
from marble.server.images import base64_image, to_base64
from marble.server.state import state_of

router = APIRouter(prefix="/controlnet", tags=["ControlNet API (sd-webui-controlnet)"])


_hashes: dict[tuple, str] = {}


def _listing(folder) -> list[str]:
    """"name [hash]" per ControlNet in the folder (the hash of a file is computed once per version of it)."""
    out = []
    for path in list_controlnets(folder):
        weights = path if path.is_file() else next(iter(sorted(path.glob("*.safetensors"))), None)
        if weights is None:
            continue
        stat = weights.stat()
        key = (str(weights), stat.st_mtime_ns, stat.st_size)
        if key not in _hashes:
            _hashes[key] = file_hash(weights)
        out.append(f"{path.stem if path.is_file() else path.name} [{_hashes[key]}]")
    return out


@router.get("/model_list", summary="ControlNets in the ControlNet folder (sd-webui-controlnet)")
async def model_list(request: Request) -> dict:
    state = state_of(request)
    return {"model_list": await state.offload(_listing, state.worker(None).pipe.controlnets.folder)}


@router.get("/module_list", summary="Preprocessors (sd-webui-controlnet); those needing weights are not available")
async def module_list() -> dict:
    return {"module_list": list(MODULES),
            "module_detail": {m: {"available": True} for m in MODULES}
            | {m: {"available": False, "reason": "needs downloaded detector weights, which marble does not ship"}
               for m in NEED_WEIGHTS}}


@router.get("/version", summary="The extension API's version (sd-webui-controlnet)")
async def version() -> dict:
    return {"version": 2}


class DetectParams(BaseModel):
    controlnet_module: str = Field("none", description="A preprocessor from /controlnet/module_list.")
    controlnet_input_images: list[str] = Field(description="base64 images.")
    controlnet_processor_res: int = Field(
        PROCESSOR_RES, description=f"The preprocessor's resolution: the image's short side is resized to it "
                                   f"(canny, threshold, scribble), {PROCESSOR_RES_RANGE[0]}..{PROCESSOR_RES_RANGE[1]}; "
                                   f"-1: {PROCESSOR_RES}. The map comes back at that size, as the extension's.")
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1

    @field_validator("controlnet_processor_res")
    @classmethod
    def _in_range(cls, value: int) -> int:
        low, high = PROCESSOR_RES_RANGE
        if value < 0:
            return PROCESSOR_RES
        if not low <= value <= high:
            raise ValueError(f"must be in [{low}, {high}] (or -1 for {PROCESSOR_RES})")
        return value


def _detect(params: DetectParams, limits) -> list[str]:
    out = []
    for i, text in enumerate(params.controlnet_input_images):
        image = base64_image(text, f"image {i}", limits)
        a, b = params.controlnet_threshold_a, params.controlnet_threshold_b
        try:
            result = preprocess(image, params.controlnet_module, a if a >= 0 else None, b if b >= 0 else None,
                                params.controlnet_processor_res)
        except ValueError as e:
            raise RequestError(str(e)) from None
        buffer = io.BytesIO()
        result.save(buffer, format="PNG")
        out.append(to_base64(buffer.getvalue()))
    return out


@router.post("/detect", summary="Run a preprocessor on images (sd-webui-controlnet)")
async def detect(params: DetectParams, request: Request) -> dict:
    state = state_of(request)
    if not params.controlnet_input_images:
        raise RequestError("controlnet_input_images is empty")
    return {"images": await state.offload(_detect, params, state.limits), "info": "Success"}

