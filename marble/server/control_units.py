"""ControlNet units in A1111 requests, as the sd-webui-controlnet extension takes them.

Units come in `alwayson_scripts.controlnet.args`, a list of objects:
  enabled (true), module ("none"), model (a name from GET /controlnet/model_list, "name [hash]"
  or "name"; names resolve only inside the ControlNet folder), weight (1), image (base64; or
  {"image": base64} as the extension's UI sends), resize_mode ("Crop and Resize"; names or 0/1/2),
  processor_res (the preprocessor's resolution, short side in px, 64..2048; < 0: the default 512),
  threshold_a, threshold_b (preprocessor parameters; < 0 means the default), guidance_start (0),
  guidance_end (1), control_mode ("Balanced"; names or 0/1/2), pixel_perfect (false; true: the
  preprocessor resolution from the image and output sizes, marble.adapters.controlnet).
Legacy aliases: `input_image` for image, `guidance` for guidance_end. A unit without an image in
img2img controls with the init image, as the extension does. Accepted and not used: low_vram, mask.
"""
from __future__ import annotations

import math
from typing import Any

from marble.adapters.controlnet import ControlSpec
from marble.request import RequestError
from marble.server.images import base64_image


def _image_field(value: Any, label: str):
    if isinstance(value, dict):   # the extension's UI form: {"image": ..., "mask": ...}
        value = value.get("image")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RequestError(f"{label}: the image must be base64 text")
    return value


def _number(unit: dict, key: str, default: float | None, label: str) -> float | None:
    value = unit.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{label}: {key} must be a number, got {value!r}")
    return float(value)


def _processor_res(unit: dict, label: str) -> int | None:
    """processor_res as sent: absent or negative (the extension's -1) -> None, the default; else a whole
    number of pixels (its range is the request's check)."""
    value = unit.get("processor_res")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value >= 0 and value != int(value)):
        raise RequestError(f"{label}: processor_res must be a whole number of pixels, got {value!r}")
    return None if value < 0 else int(value)


def parse_units(scripts: dict | None, limits, init_image=None) -> tuple[ControlSpec, ...]:
    """alwayson_scripts -> ControlSpecs with their images decoded (blocking: call off the event loop).
    One-line RequestError for anything malformed; the request's own checks follow in resolve."""
    if not scripts:
        return ()
    if not isinstance(scripts, dict):
        raise RequestError("alwayson_scripts must be an object")
    entry = next((v for k, v in scripts.items() if isinstance(k, str) and k.lower() == "controlnet"), None)
    if entry is None:
        return ()
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list):
        raise RequestError("alwayson_scripts.controlnet.args must be a list of units")
    specs = []
    for i, unit in enumerate(args):
        label = f"ControlNet unit {i}"
        if not isinstance(unit, dict):
            raise RequestError(f"{label} must be an object")
        if not unit.get("enabled", True):
            continue
        model = unit.get("model")
        if model in (None, "", "None", "none"):
            raise RequestError(f"{label}: a model from /controlnet/model_list is required")
        if not isinstance(model, str):
            raise RequestError(f"{label}: model must be text")
        text = _image_field(unit.get("image", unit.get("input_image")), label)
        image = base64_image(text, f"{label} image", limits) if text is not None else init_image
        if image is None:
            raise RequestError(f"{label}: the control image is missing")
        a, b = _number(unit, "threshold_a", None, label), _number(unit, "threshold_b", None, label)
        end = unit.get("guidance_end")
        end = unit.get("guidance", 1.0) if end is None else end   # the extension's legacy name
        specs.append(ControlSpec(
            image=image.convert("RGB"), model=model, module=str(unit.get("module") or "none"),
            weight=_number(unit, "weight", 1.0, label), start=_number(unit, "guidance_start", 0.0, label),
            end=_number({"guidance_end": end}, "guidance_end", 1.0, label),
            mode=unit.get("control_mode", "Balanced"), resize=unit.get("resize_mode", "Crop and Resize"),
            threshold_a=a if a is not None and a >= 0 else None, threshold_b=b if b is not None and b >= 0 else None,
            processor_res=_processor_res(unit, label),
            pixel_perfect=False if unit.get("pixel_perfect") is None else unit.get("pixel_perfect")))
    return tuple(specs)
