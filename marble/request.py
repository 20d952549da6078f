"""One validated generation request for every mode and every edge (CLI, server).

An edge builds a `GenerationRequest` from what the user gave (None: the model's default), and
`resolve` turns it, with the loaded model's `ModelDefaults`, into a `ResolvedRequest`: the only
kind the pipeline runs. Validation lives here and only here; both edges turn `RequestError` into
their own error shape (one stderr line and exit 2; a 4xx response).
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, fields, replace

from PIL import Image

from marble.adapters.controlnet import ControlSpec, control_mode, resize_mode
from marble.adapters.lora_loader import LoraSpec
from marble.adapters.preprocess import PROCESSOR_RES, PROCESSOR_RES_RANGE, module_name
from marble.adapters.lora_tags import LoraTagError, split_lora_tags
from marble.adapters.regions import MAX_STRENGTH as MAX_REGIONS
from marble.diffusion.few_step import FewStepSettings, few_step_warnings, get_preset
from marble.diffusion.noise import SEED_MAX
from marble.diffusion.samplers import get_sampler
from marble.diffusion.schedule import LCM_ORIGINAL_STEPS, SPACINGS
from marble.hires import HiresError, HiresFix, check_hires
from marble.models.conditioning import MicroConditioning
from marble.models.deepcache import MAX_INTERVAL
from marble.models.tome import MAX_RATIO
from marble.models.vae_tiling import check_tile_size
from marble.prompts.encode import check_emphasis
from marble.prompts.attention import PromptSyntaxError
from marble.prompts.schedule import check_prompt

MAX_STEPS = 1000
MAX_BATCH = 64
MAX_CONTROL_WEIGHT = 2.0   # sd-webui-controlnet's slider limit
MAX_MICRO_SIZE = 16384   # SDXL micro-conditioning sizes and crops, pixels (SDXL was trained on ≤ 4096)
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
    hires: HiresFix | None = None               # txt2img only: a second, img2img pass at a larger size
    emphasis: str | None = None                 # how prompt weights act (marble.prompts.encode.EMPHASIS); None: a1111
    loras: tuple[LoraSpec, ...] = ()            # LoRAs named outside the prompt (CLI --lora paths); tags stay in the prompt
    spacing: str | None = None                  # sigma spacing (marble.diffusion.schedule.SPACINGS); None: the sampler's
    preset: str | None = None                   # few-step settings by name (marble.diffusion.few_step.PRESETS)
    controls: tuple[ControlSpec, ...] = ()      # ControlNet units (marble.adapters.controlnet), in order
    micro: MicroConditioning = MicroConditioning()  # SDXL's size/crop/aesthetic conditioning (None fields: defaults)
    deepcache: int | None = None                # DeepCache interval: full U-Net every N steps (marble.models.deepcache); 1 = off
    tome: float | None = None                   # ToMe ratio of tokens merged, [0, 0.75] (marble.models.tome); 0 = off
    vae_tile_size: int | None = None            # VAE encode/decode in tiles of this side, pixels (marble.models.vae_tiling); 0 = off
    regions: float | None = None                # bind colour phrases to the first control image's colours, this strong (marble.adapters.regions); 0 = off

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "txt2img"


@dataclass(frozen=True)
class ModelDefaults:
    """What a loaded model contributes to a request: its defaults and its size constraints."""
    steps: int
    cfg: float
    sampler: str
    width: int
    height: int
    latent_factor: int          # width and height must be multiples of it
    max_pixels: int             # width·height the model accepts at most
    few_step: FewStepSettings | None = None     # a few-step model's card settings: its defaults, and warnings
    max_control_units: int = 3  # ControlNet units a request may carry
    micro: tuple[str, ...] = () # SDXL micro-conditioning the models take: "size" (base, refiner), "aesthetic" (refiner)
    unet: bool = True           # the denoiser is a U-Net: DeepCache and ToMe apply
    whole_decoder: bool = True  # ... with every decoder block and the middle block: DeepCache's shallow pass fits


@dataclass(frozen=True)
class ResolvedRequest(GenerationRequest):
    """A request with the model's defaults filled in and every check passed: seed, steps, sampler,
    cfg, width and height are set (strength too for img2img/inpaint). Made by `resolve` only;
    the pipeline and the server's queue take nothing else. `prompt` stays as typed (the record
    keeps its <lora:...> tags, as A1111's does); the text encoder reads `text_prompt`."""
    text_prompt: str = ""                       # the prompt with its LoRA tags cut out
    lora_specs: tuple[LoraSpec, ...] = ()       # `loras`, then the prompt's tags in order
    warnings: tuple[str, ...] = ()              # settings allowed but outside a few-step model's card


def resolve(request: GenerationRequest, defaults: ModelDefaults) -> ResolvedRequest:
    """The one place that fills defaults and validates; RequestError (one line) for bad input.
    Resolving a resolved request again gives the same request."""
    _check_text(request)
    text_prompt, lora_specs = _loras(request)
    seed = _seed(request.seed)
    few = _few_step(request, defaults)   # a preset, else the model's card: defaults in place of the model's
    steps = (few.default_steps if few else defaults.steps) if request.steps is None else request.steps
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise RequestError(f"steps must be an integer in [1, {MAX_STEPS}], got {steps}")
    try:
        sampler = get_sampler(request.sampler or (few.sampler if few else defaults.sampler))
    except KeyError as e:
        raise RequestError(str(e.args[0]) if e.args else f"unknown sampler {request.sampler!r}") from None
    cfg = (few.default_cfg if few else defaults.cfg) if request.cfg is None else request.cfg
    if not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or not 0 <= cfg <= MAX_CFG:
        raise RequestError(f"cfg must be a finite number in [0, {MAX_CFG:g}], got {cfg}")
    spacing = _spacing(request.spacing or (few.spacing if few else sampler.spacing), steps)
    if not isinstance(request.n, int) or not 1 <= request.n <= MAX_BATCH:
        raise RequestError(f"n must be an integer in [1, {MAX_BATCH}], got {request.n}")
    width, height = _size(request, defaults)
    strength = _strength(request)
    _check_syntax(request, steps)
    hires = _hires(request, width, height, defaults)
    _check_micro(request.micro, defaults)
    if hires is not None and hires.steps:
        _spacing(spacing, hires.steps)                  # the second pass walks the same spacing
    try:
        emphasis = check_emphasis("a1111" if request.emphasis is None else request.emphasis)
    except PromptSyntaxError as e:
        raise RequestError(str(e)) from None
    fields_ = {f.name: getattr(request, f.name) for f in fields(GenerationRequest)}
    fields_.update(seed=seed, steps=steps, sampler=sampler.name, cfg=float(cfg), width=width, height=height,
                   strength=strength, hires=hires, emphasis=emphasis, spacing=spacing,
                   controls=_controls(request, defaults), vae_tile_size=_vae_tile_size(request, defaults),
                   regions=_regions(request, defaults), **_approximations(request, defaults))
    warnings = tuple(few_step_warnings(few, steps, float(cfg))) if few else ()
    return ResolvedRequest(**fields_, text_prompt=text_prompt, lora_specs=lora_specs, warnings=warnings)


def check_approximations(deepcache, tome) -> dict:
    """DeepCache's interval and ToMe's ratio, range-checked (RequestError): {deepcache: 1, tome:
    0.0} when off (None)."""
    interval = 1 if deepcache is None else deepcache
    if isinstance(interval, bool) or not isinstance(interval, int) or not 1 <= interval <= MAX_INTERVAL:
        raise RequestError(f"deepcache must be an integer in [1, {MAX_INTERVAL}] (1 = off), got {interval!r}")
    ratio = 0.0 if tome is None else tome
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or not 0 <= ratio <= MAX_RATIO:
        raise RequestError(f"tome must be a number in [0, {MAX_RATIO:g}] (0 = off), got {ratio!r}")
    return {"deepcache": interval, "tome": float(ratio)}


def _approximations(request: GenerationRequest, defaults: ModelDefaults) -> dict:
    """check_approximations, and what the model and the request allow with them."""
    checked = check_approximations(request.deepcache, request.tome)
    interval, ratio = checked["deepcache"], checked["tome"]
    if (interval > 1 or ratio) and not defaults.unet:
        raise RequestError("DeepCache and ToMe need a U-Net; this model's denoiser is a transformer")
    if interval > 1 and not defaults.whole_decoder:
        raise RequestError("DeepCache needs the U-Net's whole decoder; this model's U-Net is cut (fewer decoder "
                           "blocks or no middle block)")
    if interval > 1 and request.controls:
        raise RequestError("DeepCache does not combine with ControlNet (the residuals reach every skip level)")
    return checked


def _regions(request: GenerationRequest, defaults: ModelDefaults) -> float:
    """The regions' strength, checked: 0.0 when off."""
    regions = 0.0 if request.regions is None else request.regions
    if isinstance(regions, bool) or not isinstance(regions, (int, float)) or not math.isfinite(regions) \
            or not 0 <= regions <= MAX_REGIONS:
        raise RequestError(f"regions must be a number in [0, {MAX_REGIONS:g}] (0 = off), got {regions!r}")
    if regions and not (request.controls and defaults.unet):
        raise RequestError("regions binds the prompt's colour phrases to a control sketch's colours: it needs a "
                           "control image (--control) and a U-Net")
    return float(regions)


def _vae_tile_size(request: GenerationRequest, defaults: ModelDefaults) -> int:
    try:
        return check_tile_size(0 if request.vae_tile_size is None else request.vae_tile_size, defaults.latent_factor)
    except ValueError as e:
        raise RequestError(str(e)) from None


def _few_step(request: GenerationRequest, defaults: ModelDefaults) -> FewStepSettings | None:
    if request.preset is None:
        return defaults.few_step
    if not isinstance(request.preset, str):
        raise RequestError("the preset must be a name")
    try:
        return get_preset(request.preset)
    except ValueError as e:
        raise RequestError(str(e)) from None


def _spacing(name, steps: int) -> str:
    name = name.strip().lower() if isinstance(name, str) else name
    if not isinstance(name, str) or name not in SPACINGS:
        raise RequestError(f"unknown spacing {name!r}; choose from: {', '.join(SPACINGS)}")
    if name == "lcm" and steps > LCM_ORIGINAL_STEPS:
        raise RequestError(f"the lcm spacing takes at most {LCM_ORIGINAL_STEPS} steps, not {steps}")
    return name


def _loras(request: GenerationRequest) -> tuple[str, tuple[LoraSpec, ...]]:
    """The prompt without its A1111 LoRA tags, and every LoRA the request names (not yet read:
    files are the pipeline's, which refuses names outside its LoRA folder)."""
    try:
        text, tags = split_lora_tags(request.prompt)
        if split_lora_tags(request.negative_prompt)[1]:
            raise RequestError("LoRA tags go in the prompt, not the negative prompt")
    except LoraTagError as e:
        raise RequestError(str(e)) from None
    for spec in request.loras:
        for value in (spec.te, spec.unet):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RequestError(f"LoRA {spec.ref}: weight {value!r} is not a finite number")
    return text, tuple(request.loras) + tuple(LoraSpec(t.name, t.te, t.unet) for t in tags)


def _controls(request: GenerationRequest, defaults: ModelDefaults) -> tuple[ControlSpec, ...]:
    """The ControlNet units, checked and with their modes in canonical names (files are the pipeline's)."""
    units = tuple(request.controls)
    if len(units) > defaults.max_control_units:
        raise RequestError(f"{len(units)} ControlNet units, at most {defaults.max_control_units} are allowed")
    out = []
    for i, u in enumerate(units):
        label = f"ControlNet unit {i}"
        if not isinstance(u, ControlSpec):
            raise RequestError(f"{label} is malformed")
        if not isinstance(u.image, Image.Image):
            raise RequestError(f"{label}: the control image is missing or not an image")
        if not isinstance(u.model, str) or not u.model.strip():
            raise RequestError(f"{label}: a ControlNet model is required")
        for what, value, low, high in (("weight", u.weight, 0.0, MAX_CONTROL_WEIGHT),
                                       ("guidance start", u.start, 0.0, 1.0), ("guidance end", u.end, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                raise RequestError(f"{label}: {what} must be a number in [{low:g}, {high:g}], got {value!r}")
        if u.start >= u.end:
            raise RequestError(f"{label}: guidance start {u.start:g} must be below guidance end {u.end:g}")
        for what, value in (("threshold a", u.threshold_a), ("threshold b", u.threshold_b)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise RequestError(f"{label}: {what} must be a finite number, got {value!r}")
        low, high = PROCESSOR_RES_RANGE
        if u.processor_res is not None and (isinstance(u.processor_res, bool) or not isinstance(u.processor_res, int)
                                            or not low <= u.processor_res <= high):
            raise RequestError(f"{label}: processor_res must be a whole number of pixels in [{low}, {high}] "
                               f"(or -1 for the default {PROCESSOR_RES}), got {u.processor_res!r}")
        if not isinstance(u.pixel_perfect, bool):
            raise RequestError(f"{label}: pixel_perfect must be true or false, got {u.pixel_perfect!r}")
        try:
            module, mode, resize = module_name(u.module), control_mode(u.mode), resize_mode(u.resize)
        except ValueError as e:
            raise RequestError(f"{label}: {e}") from None
        out.append(replace(u, module=module, mode=mode, resize=resize, weight=float(u.weight),
                           start=float(u.start), end=float(u.end)))
    return tuple(out)


def _check_text(request: GenerationRequest) -> None:
    for label, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
        if not isinstance(text, str):
            raise RequestError(f"the {label} must be text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: bad bytes on a command line, "\ud800" in JSON
            raise RequestError(f"the {label} is not valid Unicode text "
                               f"(a lone surrogate at position {e.start})") from None


def _check_syntax(request: GenerationRequest, steps: int) -> None:
    """Prompt syntax (marble.prompts): what A1111 reads literally passes, what it cannot read does not."""
    for label, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
        try:
            check_prompt(text, steps)
        except PromptSyntaxError as e:
            raise RequestError(f"the {label}: {e}") from None


def _hires(request: GenerationRequest, width: int, height: int, defaults: ModelDefaults) -> HiresFix | None:
    if request.hires is None:
        return None
    if request.init_image is not None:
        raise RequestError("the hires fix applies to txt2img only, not with an init image")
    try:
        return check_hires(request.hires, width, height, defaults.latent_factor, defaults.max_pixels, MAX_STEPS)
    except HiresError as e:
        raise RequestError(str(e)) from None


def _check_micro(micro: MicroConditioning, defaults: ModelDefaults) -> None:
    if not isinstance(micro, MicroConditioning):
        raise RequestError("micro must be a MicroConditioning")
    given = micro.given()
    sizes = [k for k in given if not k.endswith("aesthetic_score")]
    scores = [k for k in given if k.endswith("aesthetic_score")]
    if sizes and "size" not in defaults.micro:
        raise RequestError(f"{sizes[0]} applies to SDXL models only")
    if scores and "aesthetic" not in defaults.micro:
        raise RequestError(f"{scores[0]} applies to an SDXL refiner only (--refiner)")
    for k in sizes:
        low = 0 if "crop" in k else 1
        value = given[k]
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and low <= v <= MAX_MICRO_SIZE for v in value):
            raise RequestError(f"{k} must be two integers in [{low}, {MAX_MICRO_SIZE}], got {given[k]}")
    for k in scores:
        v = given[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 10:
            raise RequestError(f"{k} must be a number in [0, 10], got {v}")


def _seed(seed: int | None) -> int:
    out = secrets.randbelow(SEED_MAX + 1) if seed is None or seed == -1 else seed
    if not isinstance(out, int) or not 0 <= out <= SEED_MAX:
        raise RequestError(f"seed must be an integer in [0, {SEED_MAX}] (or -1 for random), got {seed}")
    return out


def _size(request: GenerationRequest, defaults: ModelDefaults) -> tuple[int, int]:
    init, mask = request.init_image, request.mask
    if mask is not None and init is None:
        raise RequestError("a mask needs an init image to inpaint")
    if init is not None and mask is not None and init.size != mask.size:
        raise RequestError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is "
                           f"{init.size[0]}x{init.size[1]}; they must be the same size")
    size_default = init.size if init is not None else (defaults.width, defaults.height)
    width = size_default[0] if request.width is None else request.width
    height = size_default[1] if request.height is None else request.height
    for side, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0:
            raise RequestError(f"{side} must be a positive integer, got {value}")
        if value % defaults.latent_factor:
            raise RequestError(f"{side} {value} is not a multiple of the model's latent factor "
                               f"{defaults.latent_factor}")
    if width * height > defaults.max_pixels:
        raise RequestError(f"size {width}x{height} is over the model's limit of {defaults.max_pixels} pixels")
    return width, height


def _strength(request: GenerationRequest) -> float | None:
    strength = request.strength
    if request.init_image is None:
        if strength is not None:
            raise RequestError("strength applies only with an init image (img2img or inpainting)")
        return None
    strength = (1.0 if request.mask is not None else 0.75) if strength is None else strength
    if not isinstance(strength, (int, float)) or not math.isfinite(strength) or not 0 < strength <= 1:
        raise RequestError(f"strength must be in (0, 1], got {strength}")
    return float(strength)
