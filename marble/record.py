"""The generation record: everything needed to regenerate an image exactly.

It is written into each PNG twice: as A1111's `parameters` text (which other tools read) and as
the full JSON record in a `marble` chunk (which `--from` reads back).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields

from marble.diffusion.samplers import get_sampler
from marble.diffusion.schedule import SPACINGS

EMPHASIS_NAMES = {"a1111": "Original", "no-norm": "No norm", "comfy": "ComfyUI", "none": "None"}  # A1111's names

RECORD_VERSION = 1


@dataclass(frozen=True)
class GenerationRecord:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    sampler: str
    cfg: float
    width: int
    height: int
    model_name: str
    model_hash: str
    mode: str = "txt2img"                 # txt2img | img2img | inpaint
    strength: float | None = None         # img2img / inpaint only
    init_image: str | None = None         # path of the init image as given
    init_image_sha256: str | None = None
    mask: str | None = None
    mask_sha256: str | None = None
    hires_upscaler: str | None = None     # hires fix (txt2img): None = no second pass; else marble.hires.UPSCALERS
    hires_scale: float | None = None      # upscale of the first pass (width x height), when no resize is given
    hires_resize_x: int = 0               # or the size asked for (0: from the other side / unused)
    hires_resize_y: int = 0
    hires_steps: int = 0                  # steps of the second pass; 0 = the first pass's steps
    hires_denoise: float | None = None    # strength of the second pass, (0, 1]
    emphasis: str = "a1111"               # how prompt weights act (marble.prompts.encode.EMPHASIS)
    spacing: str | None = None            # sigma spacing (marble.diffusion.schedule.SPACINGS); None: the sampler's
    vae: str | None = None                # a replacement final decoder's name (--decoder, TAESD); None: the model's VAE
    refiner: str | None = None            # the refiner model's name, when one took over (SDXL)
    refiner_hash: str | None = None
    refiner_path: str | None = None       # where the refiner was loaded from (--from reloads it)
    refiner_switch: float | None = None   # fraction of the schedule the base ran
    dtype: str = "fp32"                   # the compute dtype (fp32, bf16, fp16): bits differ between them
    micro: dict | None = None             # SDXL micro-conditioning asked for (MicroConditioning.given()); None: defaults
    deepcache: int = 1                    # DeepCache interval (full U-Net every N steps); 1 = off (exact)
    tome: float = 0.0                     # ToMe ratio of merged tokens; 0 = off (exact)
    quantize: str | None = None           # "int8": the U-Net's Linear layers dynamically quantised; None = off
    vae_tile_size: int = 0                # VAE encode/decode in tiles of this side (pixels); 0 = off (exact)
    regions: float = 0.0                  # strength binding colour phrases to the first control image's colours; 0 = off
    marble_version: str = ""
    record_version: int = RECORD_VERSION
    # LoRAs applied, in order: {"name", "hash" (A1111's, 12 hex), "te", "unet"} and "path" for one
    # given as a file (--lora) rather than by a prompt tag, which the prompt itself keeps
    loras: tuple[dict, ...] = ()
    # ControlNet units, in order: {"module", "model", "hash", "weight", "resize_mode", "guidance_start",
    # "guidance_end", "control_mode", "image", "image_sha256", "processor_res", "pixel_perfect"} and "path"
    # for a model given as a file (records before processor_res lack the last two)
    controlnets: tuple[dict, ...] = ()

    def to_parameters(self) -> str:
        """A1111's infotext layout: prompt, optional negative line, then `Key: value` pairs in A1111's
        order (Size is the first pass's; a hires fix adds its fields after Denoising strength)."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        pairs = [("Steps", self.steps), ("Sampler", self.sampler), ("CFG scale", _num(self.cfg)),
                 ("Seed", self.seed), ("Size", f"{self.width}x{self.height}"),
                 ("Model hash", self.model_hash), ("Model", self.model_name)]
        denoise = self.hires_denoise if self.hires_upscaler is not None else self.strength
        if denoise is not None:
            pairs.append(("Denoising strength", _num(denoise)))
        if self.hires_upscaler is not None:   # A1111's order: upscale or resize, steps (when set), upscaler
            if self.hires_resize_x or self.hires_resize_y:
                pairs.append(("Hires resize", f"{self.hires_resize_x}x{self.hires_resize_y}"))
            else:
                pairs.append(("Hires upscale", _num(self.hires_scale)))
            if self.hires_steps:
                pairs.append(("Hires steps", self.hires_steps))
            pairs.append(("Hires upscaler", self.hires_upscaler))
        # A1111 writes it when not its default ("Original") and a prompt has brackets for it to act on
        if self.emphasis != "a1111" and any(c in self.prompt + self.negative_prompt for c in "(["):
            pairs.append(("Emphasis", EMPHASIS_NAMES.get(self.emphasis, self.emphasis)))
        if self.spacing is not None and self.spacing != _sampler_spacing(self.sampler):
            pairs.append(("Schedule type", self.spacing))   # A1111 >= 1.9's key; marble's spacing name
        if self.vae is not None:
            pairs.append(("VAE", self.vae))   # A1111's key for a separate VAE
        if self.loras:
            pairs.append(("Lora hashes", lora_hashes(self.loras)))
        for i, unit in enumerate(self.controlnets):   # sd-webui-controlnet's unit text
            pairs.append((f"ControlNet {i}", controlnet_text(unit)))
        for key, value, off in (("DeepCache", self.deepcache, 1), ("ToMe", self.tome, 0.0),
                                ("Quantize", self.quantize, None), ("VAE tile size", self.vae_tile_size, 0),
                                ("Regions", self.regions, 0.0)):
            if value != off:   # approximations: the image differs from the exact path's
                pairs.append((key, _num(value) if isinstance(value, float) else value))
        if self.refiner is not None:   # A1111's names for its refiner
            pairs += [("Refiner", f"{self.refiner} [{self.refiner_hash}]"),
                      ("Refiner switch at", _num(self.refiner_switch))]
        pairs.append(("Version", f"marble {self.marble_version}".strip()))
        lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in pairs))
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_parameters(cls, text: str) -> "GenerationRecord":
        """A record from A1111's infotext (a PNG that another tool wrote): prompt, negative prompt,
        steps, sampler, CFG, seed, size, denoising strength, the hires fields and emphasis. The
        model is left unnamed (A1111's model names mean nothing here). ValueError for a text that
        lacks one of the required fields or has an unreadable number."""
        p = parse_parameters(text)
        missing = [k for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size") if k not in p]
        if missing:
            raise ValueError(f"the A1111 parameters lack {', '.join(missing)}")
        try:
            width, height = (int(v) for v in p["Size"].lower().split("x"))
            sampler = p["Sampler"]
            if p.get("Schedule type", "").lower() == "karras" and not sampler.endswith("Karras"):
                sampler += " Karras"   # A1111 >= 1.9 writes the spacing apart from the sampler
            hires = "Hires upscaler" in p or "Hires upscale" in p or "Hires resize" in p
            resize_x, resize_y = (int(v) for v in p["Hires resize"].lower().split("x")) \
                if "Hires resize" in p else (0, 0)
            denoise = float(p["Denoising strength"]) if "Denoising strength" in p else None
            names = {v.lower(): k for k, v in EMPHASIS_NAMES.items()}
            schedule = p.get("Schedule type", "").lower()
            return cls(prompt=p["Prompt"], negative_prompt=p["Negative prompt"], seed=int(p["Seed"]),
                       steps=int(p["Steps"]), sampler=sampler, cfg=float(p["CFG scale"]), width=width, height=height,
                       model_name="", model_hash=p.get("Model hash", ""),
                       mode="txt2img", strength=None if hires else denoise,
                       hires_upscaler=(p.get("Hires upscaler") or "Latent") if hires else None,
                       hires_scale=float(p.get("Hires upscale", 2)) if hires else None,
                       hires_resize_x=resize_x, hires_resize_y=resize_y,
                       hires_steps=int(p.get("Hires steps", 0)), hires_denoise=denoise if hires else None,
                       emphasis=names.get(p.get("Emphasis", "Original").lower(), "a1111"),
                       deepcache=int(p.get("DeepCache", 1)), tome=float(p.get("ToMe", 0)),
                       quantize=p.get("Quantize") or None, vae_tile_size=int(p.get("VAE tile size", 0)),
                       regions=float(p.get("Regions", 0)),
                       spacing=schedule if schedule in SPACINGS and schedule != "karras" else None)
        except ValueError as e:
            raise ValueError(f"the A1111 parameters have an unreadable value ({e})") from None

    @classmethod
    def from_json(cls, text: str) -> "GenerationRecord":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the marble record is not a JSON object")
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is not None
                   and f.name in ("prompt", "seed", "steps", "sampler", "cfg", "width", "height")]
        if missing:
            raise ValueError(f"the marble record lacks {', '.join(missing)}")
        data["loras"] = _read_loras(data.get("loras", []))
        data["controlnets"] = _read_controlnets(data.get("controlnets", []))
        if data.get("micro") is not None:
            from marble.models.conditioning import MicroConditioning   # here: reading a record needs no torch
            data["micro"] = MicroConditioning.from_given(data["micro"]).given() or None
        return cls(**{k: v for k, v in data.items() if k in known})


def _read_loras(loras) -> tuple[dict, ...]:
    ok = isinstance(loras, list) and all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("hash"), str)
        and all(isinstance(e.get(k), (int, float)) and not isinstance(e.get(k), bool) for k in ("te", "unet"))
        and isinstance(e.get("path", ""), str) for e in loras)
    if not ok:
        raise ValueError("the marble record's loras are malformed")
    return tuple(loras)


def _sampler_spacing(sampler: str) -> str | None:
    try:
        return get_sampler(sampler).spacing
    except KeyError:
        return None


_UNIT_TEXT = {"str": ("module", "model", "hash", "resize_mode", "control_mode", "image", "image_sha256"),
              "num": ("weight", "guidance_start", "guidance_end")}


def _read_controlnets(units) -> tuple[dict, ...]:
    ok = isinstance(units, list) and all(
        isinstance(e, dict) and all(isinstance(e.get(k), str) for k in _UNIT_TEXT["str"] if k not in ("image", "image_sha256"))
        and all(isinstance(e.get(k), (int, float)) and not isinstance(e.get(k), bool) for k in _UNIT_TEXT["num"])
        and all(isinstance(e.get(k), (str, type(None))) for k in ("image", "image_sha256", "path"))
        and (isinstance(e.get("processor_res", 512), int) and not isinstance(e.get("processor_res"), bool))
        and isinstance(e.get("pixel_perfect", False), bool) for e in units)
    if not ok:
        raise ValueError("the marble record's controlnets are malformed")
    return tuple(units)


def controlnet_text(unit: dict) -> str:
    """sd-webui-controlnet's infotext of one unit: `Module: canny, Model: name [hash], Weight: 1, ...`
    (its keys; the extension reads them by name, so Processor Res and Pixel Perfect, which records
    before them lack, come last)."""
    text = (f"Module: {unit['module']}, Model: {unit['model']} [{unit['hash']}], Weight: {_num(unit['weight'])}, "
            f"Resize Mode: {unit['resize_mode']}, Guidance Start: {_num(unit['guidance_start'])}, "
            f"Guidance End: {_num(unit['guidance_end'])}, Control Mode: {unit['control_mode']}")
    if "processor_res" in unit:
        text += f", Processor Res: {unit['processor_res']}, Pixel Perfect: {bool(unit.get('pixel_perfect'))}"
    return text


def lora_hashes(loras) -> str:
    """A1111's "Lora hashes" value: `name: hash, name: hash`, each name once."""
    seen: dict[str, str] = {}
    for entry in loras:
        seen.setdefault(entry["name"], entry["hash"])
    return ", ".join(f"{name}: {h}" for name, h in seen.items())


def _num(x: float) -> str:
    return f"{x:g}"


def _quote(value: str) -> str:
    # A1111 quotes values containing its separators
    return json.dumps(value, ensure_ascii=False) if ("," in value or ":" in value or "\n" in value) else value


_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """Parse A1111 infotext into {"Prompt", "Negative prompt", "Steps", ...} (values as strings)."""
    lines = text.strip().split("\n")
    params_line = lines[-1] if len(lines) > 1 and _PAIR.match(lines[-1]) and "Steps:" in lines[-1] else ""
    body = lines[:-1] if params_line else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    out = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in _PAIR.findall(params_line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        out[key.strip()] = value
    return out
