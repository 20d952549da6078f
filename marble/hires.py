"""Hires fix (A1111's "Hires. fix"): generate at the base size, upscale, then run img2img at the
upscaled size with `denoise` of the schedule, so the model adds detail at a size it would compose
badly from scratch.

The upscale is either of the latent (A1111's "Latent" family: torch interpolation of the latent,
no decode) or of the decoded image (Lanczos, Nearest); learned upscalers (ESRGAN, ...) need weights
marble does not ship and are not offered. Sizes follow A1111: `scale` multiplies the base size;
`resize_x`/`resize_y` ask for a size instead (one of them keeps the aspect ratio; both: the
upscale covers that size and the centre is cropped to it). The result is floored to the latent
factor, as A1111's latent size floors it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image

# name -> (torch interpolation mode, antialias), A1111's latent upscale modes
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# A1111's "None" upscaler leaves the image to its final Lanczos resize
IMAGE_UPSCALERS = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST, "None": Image.LANCZOS}
UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)
DEFAULT_UPSCALER = "Latent"      # A1111's default hr_upscaler
MAX_SCALE = 8.0


DEFAULT_DENOISE = 0.7            # A1111's default denoising strength


class HiresError(ValueError):
    """Hires settings that cannot be run; the message is one line for the user."""


@dataclass(frozen=True)
class HiresFix:
    """A second pass for txt2img: upscale by `scale` (or to resize_x/resize_y), then img2img with
    `denoise` of a `steps`-step schedule (0: the first pass's steps)."""
    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    steps: int = 0
    denoise: float = DEFAULT_DENOISE
    upscaler: str = DEFAULT_UPSCALER


def check_hires(hires: HiresFix, width: int, height: int, factor: int, max_pixels: int, max_steps: int) -> HiresFix:
    """The settings with the upscaler's canonical name, or HiresError (one line)."""
    upscaler = upscaler_name(hires.upscaler)
    size = hires_size(width, height, scale=hires.scale, resize_x=hires.resize_x, resize_y=hires.resize_y,
                      factor=factor)
    if size.width * size.height > max_pixels:
        raise HiresError(f"the hires size {size.width}x{size.height} is over the model's limit of {max_pixels} pixels")
    if max(size.cover_width, 1) * max(size.cover_height, 1) > 4 * max_pixels:
        raise HiresError(f"the hires upscale to {size.cover_width}x{size.cover_height} is too large to crop from")
    if not isinstance(hires.steps, int) or isinstance(hires.steps, bool) or not 0 <= hires.steps <= max_steps:
        raise HiresError(f"hires steps must be an integer in [0, {max_steps}] (0: the first pass's), "
                         f"got {hires.steps!r}")
    d = hires.denoise
    if not isinstance(d, (int, float)) or isinstance(d, bool) or not math.isfinite(d) or not 0 < d <= 1:
        raise HiresError(f"hires denoising strength must be in (0, 1], got {d!r}")
    return replace(hires, upscaler=upscaler, scale=float(hires.scale), denoise=float(d))


def upscaler_name(name: str | None) -> str:
    """The canonical name of an upscaler, matched without regard to case; None is the default."""
    if name is None or name == "":
        return DEFAULT_UPSCALER
    for known in UPSCALERS:
        if known.lower() == str(name).strip().lower():
            return known
    raise HiresError(f"unknown hires upscaler {name!r}; marble can run: {', '.join(UPSCALERS)}")


@dataclass(frozen=True)
class HiresSize:
    """The upscale of a width x height first pass: resized to cover_* then centre-cropped to width x height."""
    cover_width: int
    cover_height: int
    width: int
    height: int


def hires_size(width: int, height: int, *, scale: float = 2.0, resize_x: int = 0, resize_y: int = 0,
               factor: int = 8) -> HiresSize:
    """A1111's target size of the second pass (its `calculate_target_resolution`), floored to `factor`."""
    for label, value in (("hires resize x", resize_x), ("hires resize y", resize_y)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise HiresError(f"{label} must be a whole number of pixels (0: unused), got {value!r}")
    if not resize_x and not resize_y:
        if not isinstance(scale, (int, float)) or not 1.0 <= scale <= MAX_SCALE:
            raise HiresError(f"hires scale must be a number in [1, {MAX_SCALE:g}], got {scale!r}")
        cover_x, cover_y = int(width * scale), int(height * scale)
        target_x, target_y = cover_x, cover_y
    elif not resize_y:
        cover_x, cover_y = resize_x, resize_x * height // width
        target_x, target_y = cover_x, cover_y
    elif not resize_x:
        cover_x, cover_y = resize_y * width // height, resize_y
        target_x, target_y = cover_x, cover_y
    else:
        target_x, target_y = resize_x, resize_y
        if width / height < resize_x / resize_y:     # the first pass is narrower: match widths, crop height
            cover_x, cover_y = resize_x, resize_x * height // width
        else:
            cover_x, cover_y = resize_y * width // height, resize_y
    floor = lambda v: v // factor * factor
    size = HiresSize(floor(cover_x), floor(cover_y), floor(target_x), floor(target_y))
    if min(size.width, size.height) < factor:
        raise HiresError(f"the hires size {size.width}x{size.height} is empty")
    return size


def _crop_box(full: int, keep: int) -> tuple[int, int]:
    """Keep `keep` of `full` cells, dropping the excess half before and half (rounded up) after, as A1111."""
    cut = full - keep
    return cut // 2, full - (cut + 1) // 2


def upscale_latent(latent: torch.Tensor, size: HiresSize, factor: int,
                   upscaler: str = DEFAULT_UPSCALER) -> torch.Tensor:
    """(B, C, h, w) latent -> the second pass's start latent (A1111's latent upscale and crop)."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    out = F.interpolate(latent, size=(size.cover_height // factor, size.cover_width // factor), mode=mode,
                        antialias=antialias)
    y0, y1 = _crop_box(out.shape[2], size.height // factor)
    x0, x1 = _crop_box(out.shape[3], size.width // factor)
    return out[:, :, y0:y1, x0:x1]


def upscale_image(image: Image.Image, size: HiresSize, factor: int, upscaler: str = "Lanczos") -> Image.Image:
    """The decoded first pass resized to the cover size and centre-cropped (in whole latent cells, as
    the latent path crops): the second pass's init image."""
    out = image.resize((size.cover_width, size.cover_height), IMAGE_UPSCALERS[upscaler])
    x0, x1 = _crop_box(size.cover_width // factor, size.width // factor)
    y0, y1 = _crop_box(size.cover_height // factor, size.height // factor)
    return out.crop((x0 * factor, y0 * factor, x1 * factor, y1 * factor))
