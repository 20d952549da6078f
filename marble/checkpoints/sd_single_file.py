"""Original Stable Diffusion single-file checkpoints (CompVis / A1111 layout).

Keys: `model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE) and `cond_stage_model.*`
(text): SD1 stores transformers' CLIPTextModel under `cond_stage_model.transformer.`, SD2 OpenCLIP's
text tower under `cond_stage_model.model.` (fused q/k/v `in_proj`, `resblocks`, `ln_final`).
marble's U-Net and VAE use the CompVis names, so those are a prefix swap; the OpenCLIP tower is
renamed to CLIPTextModel names, splitting `in_proj` into q/k/v, and its last resblock (unused by
SD2's penultimate-layer conditioning), `text_projection` and `logit_scale` are dropped.

These files carry no config. The architecture is recognised from a few key shapes (SD1 or SD2
text tower, 4 or 9 U-Net input channels) and must then match the released preset key for key;
the prediction type comes from `--prediction`, else an A1111-style sidecar `NAME.yaml`
(`parameterization: "v"`), else the family default (SD1 and inpainting: eps; SD2: v, as 2.x-768;
2.x-base users pass --prediction eps). Files marble writes carry their full marble config in the
metadata ("marble_config"), which then replaces the recognition step.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from marble.checkpoints.checkpoint import (Checkpoint, TensorSource, config_from_metadata, convert_state,
                                           expected_state, file_hash, open_source, refuse_existing,
                                           text_is_external)
from marble.config import config_to_json
from marble.errors import ModelLoadError
from marble.diffusion.schedule import make_schedule
from marble.fileio import write_new
from marble.models.clip import CLIPTextConfig
from marble.models.latent_diffusion import LatentDiffusionConfig
from marble.models.stable_diffusion import sd_config
from marble.models.text import text_config_from_dict
from marble.tensor_file import safetensors_writer

UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."
# ldm's DDPM buffers and training leftovers: known, not needed (the schedule is checked, not read)
IGNORED_KEYS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
                SD2_TEXT + "text_projection", SD2_TEXT + "logit_scale", SD2_TEXT + "attn_mask"}
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")
# OpenCLIP text tower -> CLIPTextModel, per resblock and for the rest
_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPENCLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                 "positional_embedding": "embeddings.position_embedding.weight",
                 "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_CLIP_TO_OPENCLIP_LAYER = {v: k for k, v in _OPENCLIP_LAYER.items()}
_CLIP_TO_OPENCLIP_TOP = {v: k for k, v in _OPENCLIP_TOP.items()}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def is_sd_single_file(keys) -> bool:
    return any(k.startswith(UNET) for k in keys)


# --- recognising the architecture ------------------------------------------------------------------

def detect_preset(shapes: dict[str, tuple[int, ...]], path: Path) -> str:
    """Which released architecture the keys describe: sd15, sd15-inpaint, sd21-v, sd2-inpaint."""
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        raise ModelLoadError(f"{path} is an SDXL checkpoint; marble reads Stable Diffusion 1.x and 2.x")
    sd1 = any(k.startswith(SD1_TEXT) for k in shapes)
    sd2 = any(k.startswith(SD2_TEXT) for k in shapes)
    if sd1 == sd2:
        raise ModelLoadError(f"{path} has {'no' if not sd1 else 'two'} text encoders under cond_stage_model.*; "
                             "marble reads SD1 (CLIP ViT-L) and SD2 (OpenCLIP ViT-H) checkpoints")
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise ModelLoadError(f"{path} has no U-Net input convolution ({UNET}input_blocks.0.0.weight)")
    if conv_in[1] not in (4, 9):
        raise ModelLoadError(f"{path}: a U-Net with {conv_in[1]} input channels is not SD (4) or SD inpainting (9)")
    inpaint = conv_in[1] == 9
    if sd1:
        return "sd15-inpaint" if inpaint else "sd15"
    return "sd2-inpaint" if inpaint else "sd21-v"


def sidecar_prediction(path: Path) -> str | None:
    """A1111's convention: `model.yaml` beside `model.safetensors` with ldm's `parameterization`."""
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    try:
        text = yaml_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    match = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", text, re.MULTILINE)
    if not match:
        return "eps"   # ldm's default
    value = match.group(1)
    return {"eps": "eps", "v": "v", "x0": "x0"}.get(value)


def check_schedule(source: TensorSource, config: LatentDiffusionConfig, path: Path) -> None:
    """ldm stores its DDPM buffers; refuse a schedule other than the one the config assumes."""
    if "alphas_cumprod" not in source.shapes():
        return
    _, stored = next(iter(source.read(["alphas_cumprod"], torch.float64)))
    ours = make_schedule(**config.schedule).alphas_cumprod
    if stored.shape != ours.shape or not torch.allclose(stored, ours, rtol=1e-5, atol=1e-7):
        raise ModelLoadError(f"{path} was trained on a noise schedule other than SD's scaled-linear "
                             f"0.00085..0.012 (its alphas_cumprod differ); marble cannot sample it correctly")


# --- keys ------------------------------------------------------------------------------------------

def _openclip_to_marble(inner: str, t: torch.Tensor, layers: int):
    """One OpenCLIP text-tower tensor -> [(marble key, tensor)]; None if unknown."""
    base = "text_encoder.text_model."
    if inner in _OPENCLIP_TOP:
        return [(base + _OPENCLIP_TOP[inner], t)]
    match = _RESBLOCK.fullmatch(inner)
    if not match:
        return None
    i, rest = int(match.group(1)), match.group(2)
    if i >= layers:
        return []    # beyond the layer SD2 conditions on
    layer = f"{base}encoder.layers.{i}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]
        return [(f"{layer}self_attn.{p}_proj.{kind}", part.clone())
                for p, part in zip("qkv", t.chunk(3, dim=0))]
    head, _, leaf = rest.rpartition(".")
    return [(f"{layer}{_OPENCLIP_LAYER[head]}.{leaf}", t)] if head in _OPENCLIP_LAYER else None


def to_marble_fn(config: LatentDiffusionConfig):
    text = text_config_from_dict(config.text)
    layers = text.layers if isinstance(text, CLIPTextConfig) else 0

    def to_marble(name: str, t: torch.Tensor):
        if name in IGNORED_KEYS or name.startswith(IGNORED_PREFIXES) or name.endswith("position_ids"):
            return []
        if name.startswith(UNET):
            return [("unet." + name[len(UNET):], t)]
        if name.startswith(VAE):
            return [("vae." + name[len(VAE):], t)]
        if name.startswith(SD1_TEXT):
            inner = name[len(SD1_TEXT):]
            # older SD1 files were saved before transformers nested the model under text_model.
            return [("text_encoder." + (inner if inner.startswith("text_model.") else "text_model." + inner), t)]
        if name.startswith(SD2_TEXT):
            return _openclip_to_marble(name[len(SD2_TEXT):], t, layers)
        return None

    return to_marble


def openclip_name(inner: str) -> str:
    """A CLIPTextModel key (under text_model.) -> its OpenCLIP name; q/k/v all map to in_proj."""
    inner = inner.removeprefix("text_model.")
    if inner in _CLIP_TO_OPENCLIP_TOP:
        return SD2_TEXT + _CLIP_TO_OPENCLIP_TOP[inner]
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", inner)
    if not match:
        raise ValueError(f"no OpenCLIP name for text_model.{inner}")
    i, head, leaf = match.groups()
    block = f"{SD2_TEXT}transformer.resblocks.{i}."
    if head in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"{block}attn.in_proj_{leaf}"
    return f"{block}{_CLIP_TO_OPENCLIP_LAYER[head]}.{leaf}"


def describe_fn(sd2: bool):
    """marble key -> the single file's name (for messages)."""
    def describe(key: str) -> str:
        component, inner = key.split(".", 1)
        if component == "unet":
            return UNET + inner
        if component == "vae":
            return VAE + inner
        if not sd2:
            return SD1_TEXT + inner
        try:
            return openclip_name(inner)
        except (ValueError, KeyError):
            return key
    return describe


# --- reading ---------------------------------------------------------------------------------------

def read_single_file(path: Path, dtype: torch.dtype | None = None, allow_pickle: bool = False,
                     prediction: str | None = None, source: TensorSource | None = None,
                     config: LatentDiffusionConfig | None = None) -> Checkpoint:
    """`config` declares the architecture instead of recognising it (for files of other shapes)."""
    path = Path(path)
    source = source or open_source(path, allow_pickle)
    shapes = {k: shape for k, (shape, _) in source.shapes().items()}
    meta = getattr(source, "headers", [None])[0]
    stored = meta.metadata.get("marble_config") if meta is not None else None
    if config is not None:
        pass
    elif stored:
        config = config_from_metadata(path, stored, LatentDiffusionConfig, "marble")
    else:
        config = sd_config(detect_preset(shapes, path), name=path.stem)
    prediction = prediction or sidecar_prediction(path)
    if prediction and prediction != config.prediction:
        config = config.replace(prediction=prediction)
    check_schedule(source, config, path)
    sd2 = any(k.startswith(SD2_TEXT) for k in shapes)
    state = convert_state(source, to_marble_fn(config), expected_state(config), dtype, describe_fn(sd2))
    return Checkpoint(config, state, path, file_hash(path), "single-file")


# --- writing ---------------------------------------------------------------------------------------

def single_file_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """marble keys -> SD single-file keys; SD2-style text towers (gelu, pad "!") become OpenCLIP's."""
    config = ckpt.config
    if text_is_external(config):
        raise ValueError("this model's text encoder is not CLIP; it has no Stable Diffusion layout")
    text = text_config_from_dict(config.text)
    openclip = isinstance(text, CLIPTextConfig) and text.activation == "gelu"
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in ckpt.state.items():
        component, inner = key.split(".", 1)
        if component == "unet":
            out[UNET + inner] = t
        elif component == "vae":
            out[VAE + inner] = t
        elif not openclip:
            out[SD1_TEXT + inner] = t
        elif ".self_attn.q_proj." in inner or ".self_attn.k_proj." in inner or ".self_attn.v_proj." in inner:
            fused.setdefault(openclip_name(inner), {})[inner.split(".self_attn.")[1][0]] = t
        else:
            out[openclip_name(inner)] = t
    for name, parts in fused.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])   # OpenCLIP's in_proj order
    return out


def write_single_file(ckpt: Checkpoint, path: Path) -> Path:
    """An SD single file (safetensors), with the marble config in the metadata; atomic, never over a file."""
    path = refuse_existing(path)
    state = single_file_state(ckpt)
    return write_new(path, safetensors_writer(state, {"format": "pt", "marble_config": config_to_json(ckpt.config)}))
