"""Original Stable Diffusion single-file checkpoints (CompVis / A1111 layout).

Keys: `model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE) and `cond_stage_model.*`
(text): SD1 stores transformers' CLIPTextModel under `cond_stage_model.transformer.`, SD2 OpenCLIP's
text tower under `cond_stage_model.model.` (fused q/k/v `in_proj`, `resblocks`, `ln_final`).
SDXL (sgm) keeps its towers under `conditioner.embedders.i.`: the base CLIP ViT-L as
`.transformer.` (CLIPTextModel names) and OpenCLIP bigG as `.model.` (all 32 resblocks, and
`text_projection` stored as x @ P, i.e. transposed against a Linear weight); the refiner bigG
alone as `conditioner.embedders.0.model.`. Tower i becomes marble's `text_encoder.encoders.i.`.
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
from marble.models.clip_concat import CLIPConcatConfig
from marble.models.latent_diffusion import LatentDiffusionConfig
from marble.models.stable_diffusion import sd_config
from marble.models.text import text_config_from_dict
from marble.tensor_file import safetensors_writer

UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_TEXT = "conditioner.embedders."
_SDXL_TOWER = re.compile(r"conditioner\.embedders\.(\d+)\.(transformer|model)\.(.+)")
# key fragments of diffusion models marble does not load, for an error that names the family
UNSUPPORTED_FAMILIES = (("joint_blocks.", "SD3"), ("double_blocks.", "Flux"), ("single_blocks.", "Flux"))
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


def unsupported_family(keys) -> str | None:
    """"SD3", "Flux", ... when the keys are those of a family marble does not load."""
    for fragment, family in UNSUPPORTED_FAMILIES:
        if any(fragment in k for k in keys):
            return family
    return None


def refuse_unsupported(keys, path: Path) -> None:
    family = unsupported_family(keys)
    if family:
        raise ModelLoadError(f"{path}: this looks like an {family} checkpoint; marble loads SD1.x, SD2.x and SDXL")


# --- recognising the architecture ------------------------------------------------------------------

def detect_preset(shapes: dict[str, tuple[int, ...]], path: Path) -> str:
    """Which released architecture the keys describe: sd15, sd15-inpaint, sd21-v, sd2-inpaint,
    sdxl-base, sdxl-refiner."""
    refuse_unsupported(shapes, path)
    if any(k.startswith(SDXL_TEXT) for k in shapes):
        return detect_sdxl(shapes, path)
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


def detect_sdxl(shapes: dict[str, tuple[int, ...]], path: Path) -> str:
    """SDXL base (CLIP-L + bigG towers) or refiner (bigG alone), by the towers the file holds."""
    if any(k.startswith("cond_stage_model.") for k in shapes):
        raise ModelLoadError(f"{path} has text encoders under both cond_stage_model.* and conditioner.*")
    towers = {(int(m.group(1)), m.group(2)) for m in map(_SDXL_TOWER.fullmatch, shapes) if m}
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise ModelLoadError(f"{path}: an SDXL U-Net with {conv_in[1]} input channels (inpainting?) is not supported; "
                             "marble loads SDXL base and refiner")
    if towers == {(0, "transformer"), (1, "model")}:
        return "sdxl-base"
    if towers == {(0, "model")}:
        return "sdxl-refiner"
    found = ", ".join(f"{SDXL_TEXT}{i}.{kind}" for i, kind in sorted(towers)) or "none"
    raise ModelLoadError(f"{path}: SDXL text towers {found}; marble reads SDXL base (CLIP-L as embedders.0.transformer, "
                         "bigG as embedders.1.model) and refiner (bigG as embedders.0.model)")


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

def _openclip_to_marble(inner: str, t: torch.Tensor, layers: int, tower: str = "text_encoder."):
    """One OpenCLIP text-tower tensor -> [(marble key, tensor)]; None if unknown. `tower` is the
    marble module holding the CLIPTextEncoder."""
    base = tower + "text_model."
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
        # row blocks of a contiguous tensor are contiguous views: no copy, so with --low-memory
        # q, k and v stay pages of the mapped file, which the release can find (issue 17)
        return [(f"{layer}self_attn.{p}_proj.{kind}", part)
                for p, part in zip("qkv", t.chunk(3, dim=0))]
    head, _, leaf = rest.rpartition(".")
    return [(f"{layer}{_OPENCLIP_LAYER[head]}.{leaf}", t)] if head in _OPENCLIP_LAYER else None


def _sdxl_tower_to_marble(name: str, t: torch.Tensor):
    """conditioner.embedders.i.{transformer,model}.* -> text_encoder.encoders.i.*; None if unknown."""
    match = _SDXL_TOWER.fullmatch(name)
    if not match:
        return None
    i, kind, inner = match.groups()
    tower = f"text_encoder.encoders.{i}."
    if kind == "transformer":
        return [(tower + (inner if inner.startswith("text_model.") else "text_model." + inner), t)]
    if inner in ("logit_scale", "attn_mask"):
        return []
    if inner == "text_projection":   # OpenCLIP computes x @ P; a Linear weight is P transposed
        return [(tower + "text_projection.weight", t.T.contiguous())]
    return _openclip_to_marble(inner, t, 10**6, tower)


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
        if name.startswith(SDXL_TEXT):
            return _sdxl_tower_to_marble(name, t)
        return None

    return to_marble


def openclip_name(inner: str, prefix: str = SD2_TEXT) -> str:
    """A CLIPTextModel key (under text_model.) -> its OpenCLIP name under `prefix`; q/k/v all map
    to in_proj."""
    if inner == "text_projection.weight":
        return prefix + "text_projection"
    inner = inner.removeprefix("text_model.")
    if inner in _CLIP_TO_OPENCLIP_TOP:
        return prefix + _CLIP_TO_OPENCLIP_TOP[inner]
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", inner)
    if not match:
        raise ValueError(f"no OpenCLIP name for text_model.{inner}")
    i, head, leaf = match.groups()
    block = f"{prefix}transformer.resblocks.{i}."
    if head in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"{block}attn.in_proj_{leaf}"
    return f"{block}{_CLIP_TO_OPENCLIP_LAYER[head]}.{leaf}"


def _is_openclip(tower: CLIPTextConfig) -> bool:
    """Towers stored in OpenCLIP's layout: gelu ones (OpenCLIP ViT-H, bigG); quick_gelu is OpenAI's."""
    return tower.activation == "gelu"


def _sdxl_tower_name(inner: str, towers: tuple[CLIPTextConfig, ...]) -> str:
    """marble `encoders.i.X` -> the sgm file's name; q/k/v all map to in_proj."""
    _, i, rest = inner.split(".", 2)
    prefix = f"{SDXL_TEXT}{i}."
    if _is_openclip(towers[int(i)]):
        return openclip_name(rest, prefix + "model.")
    return prefix + "transformer." + rest


def describe_fn(sd2: bool, towers: tuple[CLIPTextConfig, ...] = ()):
    """marble key -> the single file's name (for messages); `towers` for SDXL files."""
    def describe(key: str) -> str:
        component, inner = key.split(".", 1)
        if component == "unet":
            return UNET + inner
        if component == "vae":
            return VAE + inner
        if towers:
            try:
                return _sdxl_tower_name(inner, towers)
            except (ValueError, KeyError, IndexError):
                return key
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
                     config: LatentDiffusionConfig | None = None, mapped: bool = False) -> Checkpoint:
    """`config` declares the architecture instead of recognising it (for files of other shapes);
    `mapped`: memory-map what needs no cast (checkpoint.SafetensorsSource)."""
    path = Path(path)
    source = source or open_source(path, allow_pickle, mapped)
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
    text = text_config_from_dict(config.text)
    towers = text.encoders if isinstance(text, CLIPConcatConfig) else ()
    state = convert_state(source, to_marble_fn(config), expected_state(config), dtype, describe_fn(sd2, towers))
    return Checkpoint(config, state, path, file_hash(path), "single-file")


# --- writing ---------------------------------------------------------------------------------------

def _text_layout(config: LatentDiffusionConfig) -> tuple[bool, tuple[CLIPTextConfig, ...]]:
    """How a single file stores `config`'s text encoder: (one tower in OpenCLIP's layout, as SD2's
    gelu towers; SDXL's towers, else ())."""
    if text_is_external(config):
        raise ValueError("this model's text encoder is not CLIP; it has no Stable Diffusion layout")
    text = text_config_from_dict(config.text)
    openclip = isinstance(text, CLIPTextConfig) and text.activation == "gelu"
    return openclip, text.encoders if isinstance(text, CLIPConcatConfig) else ()


def single_file_names(config: LatentDiffusionConfig):
    """marble key -> the key single_file_state writes it under (an OpenCLIP tower's q, k and v all
    go to one in_proj), without the tensors: what a writer that streams needs to group them."""
    return describe_fn(*_text_layout(config))


def single_file_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """marble keys -> SD single-file keys; SD2-style text towers (gelu, pad "!") become OpenCLIP's."""
    openclip, towers = _text_layout(ckpt.config)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in ckpt.state.items():
        component, inner = key.split(".", 1)
        if component == "unet":
            out[UNET + inner] = t
        elif component == "vae":
            out[VAE + inner] = t
        elif towers and inner.endswith(".text_projection.weight") and _is_openclip(towers[int(inner.split(".")[1])]):
            out[_sdxl_tower_name(inner, towers)] = t.T.contiguous()   # OpenCLIP stores P for x @ P
        elif towers and ".self_attn." in inner and inner.split(".self_attn.")[1][0] in "qkv" \
                and _is_openclip(towers[int(inner.split(".")[1])]):
            fused.setdefault(_sdxl_tower_name(inner, towers), {})[inner.split(".self_attn.")[1][0]] = t
        elif towers:
            out[_sdxl_tower_name(inner, towers)] = t
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
