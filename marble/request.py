"""One validated generation request for every mode and every edge (CLI, server).

Validation lives here and only here; both edges turn `RequestError` into their own error shape
(one stderr line and exit 2; a 4xx response).
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace

from PIL import Image

from marble.diffusion.noise import SEED_MAX
from marble.diffusion.samplers import get_sampler

MAX_STEPS = 1000
MAX_BATCH = 64
MAX_CFG = 100.0   # ComfyUI's limit too; far past where guidance saturates, and keeps cfg·x0 finite in float32


class RequestError(ValueError):
    """Invalid request; the message is one line for the user."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str                                 # "" is allowed: unconditional generation
    negative_prompt: str = ""                   # replaces the empty prompt in the unconditional branch of CFG
    seed: int | None = None                     # None: a random seed, recorded; image i uses seed + i
    steps: int | None = None                    # sampler steps, 1..1000 (None: the model's default)
    sampler: str | None = None                  # a registered name, see `marble samplers`
    cfg: float | None = None                    # classifier-free guidance scale in [0, 100]; 1 = conditional only
    width: int | None = None                    # pixels; a multiple of the model's latent factor
    height: int | None = None
    n: int = 1                                  # images, seeds seed..seed+n-1
    strength: float | None = None               # img2img/inpaint: fraction of the schedule to re-run, (0, 1]
    init_image: Image.Image | None = field(default=None, compare=False, repr=False)
    mask: Image.Image | None = field(default=None, compare=False, repr=False)  # white = repaint
    init_image_path: str | None = None          # recorded for --from
    init_image_sha256: str | None = None
    mask_path: str | None = None
    mask_sha256: str | None = None

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "txt2img"

    def resolved(self, *, default_steps: int, default_cfg: float, default_sampler: str,
                 default_width: int, default_height: int, latent_factor: int, max_pixels: int) -> "GenerationRequest":
        """Fill defaults from the model and check everything; returns a request with no None left
        in seed/steps/sampler/cfg/size (and strength for img2img/inpaint)."""
        for label, text in (("prompt", self.prompt), ("negative prompt", self.negative_prompt)):
            if not isinstance(text, str):
                raise RequestError(f"the {label} must be text")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: from bad bytes on a command line or "\ud800" in JSON
                raise RequestError(f"the {label} is not valid Unicode text") from None
        seed = secrets.randbelow(SEED_MAX + 1) if self.seed is None or self.seed == -1 else self.seed
        if not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
            raise RequestError(f"seed must be an integer in [0, {SEED_MAX}] (or -1 for random), got {self.seed}")
        steps = default_steps if self.steps is None else self.steps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
            raise RequestError(f"steps must be an integer in [1, {MAX_STEPS}], got {steps}")
        try:
            sampler = get_sampler(self.sampler or default_sampler).name
        except KeyError as e:
            raise RequestError(str(e.args[0]) if e.args else f"unknown sampler {self.sampler!r}") from None
        cfg = default_cfg if self.cfg is None else self.cfg
        if not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or not 0 <= cfg <= MAX_CFG:
            raise RequestError(f"cfg must be a finite number in [0, {MAX_CFG:g}], got {cfg}")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_BATCH:
            raise RequestError(f"n must be an integer in [1, {MAX_BATCH}], got {self.n}")

        init, mask = self.init_image, self.mask
        if mask is not None and init is None:
            raise RequestError("a mask needs an init image to inpaint")
        if init is not None and mask is not None and init.size != mask.size:
            raise RequestError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is "
                               f"{init.size[0]}x{init.size[1]}; they must be the same size")
        size_default = init.size if init is not None else (default_width, default_height)
        width = size_default[0] if self.width is None else self.width
        height = size_default[1] if self.height is None else self.height
        for side, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value <= 0:
                raise RequestError(f"{side} must be a positive integer, got {value}")
            if value % latent_factor:
                raise RequestError(f"{side} {value} is not a multiple of the model's latent factor {latent_factor}")
        if width * height > max_pixels:
            raise RequestError(f"size {width}x{height} is over the model's limit of {max_pixels} pixels")

        strength = self.strength
        if init is None:
            if strength is not None:
                raise RequestError("strength applies only with an init image (img2img or inpainting)")
        else:
            strength = (1.0 if mask is not None else 0.75) if strength is None else strength
            if not isinstance(strength, (int, float)) or not math.isfinite(strength) or not 0 < strength <= 1:
                raise RequestError(f"strength must be in (0, 1], got {strength}")
        return replace(self, seed=seed, steps=steps, sampler=sampler, cfg=float(cfg), width=width,
                       height=height, strength=None if strength is None else float(strength))
