"""diffusers pipeline folders: model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/.

Reading translates each component's config.json into marble's typed configs (refusing features
marble's networks do not have, by name) and renames keys with marble.checkpoints.diffusers_keys.
Writing produces a folder that diffusers' StableDiffusionPipeline.from_pretrained loads offline:
configs, safetensors weights, CLIP tokenizer files made from marble's shipped BPE vocabulary, and an
Euler scheduler config. marble's own fields that diffusers has no place for (name, defaults,
clip skip) ride along in model_index.json under "_marble" (underscore keys are ignored by diffusers).
Weights are read with safetensors; `.bin` pickles only with allow_pickle (torch.load weights_only).

SDXL folders (StableDiffusionXLPipeline, the refiner's StableDiffusionXLImg2ImgPipeline) add
text_encoder_2/ + tokenizer_2/ (bigG, CLIPTextModelWithProjection; the refiner has it alone) and the
U-Net's "text_time" addition embedding; their towers become marble's `text_encoder.encoders.i`,
and model_index.json's force_zeros_for_empty_prompt / requires_aesthetics_score its vector
conditioning. SD3, Flux and other pipelines are refused by name.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from marble.checkpoints.checkpoint import (Checkpoint, SafetensorsSource, TensorSource, convert_state,
                                           expected_state, file_hash, open_source, text_is_external)
from marble.checkpoints.diffusers_keys import (inverse, rename, unet_table, vae_from_diffusers_tensor,
                                               vae_reverse_table, vae_table, vae_to_diffusers_tensor)
from marble.config import config_to_dict
from marble.errors import ModelLoadError
from marble.models.clip import CLIPTextConfig
from marble.models.clip_concat import CLIPConcatConfig
from marble.models.conditioning import VectorConditioning
from marble.models.latent_diffusion import LatentDiffusionConfig
from marble.models.text import text_config_from_dict
from marble.models.tokenizer import CLIP_BOS, CLIP_EOS, bytes_to_unicode, clip_vocab, read_clip_merges
from marble.models.unet import UNetConfig
from marble.models.vae import VAEConfig
from marble.tensor_file import read_header, safetensors_writer

DIFFUSERS_VERSION = "0.30.0"     # written into configs; any diffusers from 0.21 on reads them
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}
PICKLE_FILES = {"unet": "diffusion_pytorch_model.bin", "vae": "diffusion_pytorch_model.bin",
                "text_encoder": "pytorch_model.bin", "text_encoder_2": "pytorch_model.bin"}
SDXL_TOWERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
# pipelines of families marble does not load: a class-name fragment -> the family's name
UNSUPPORTED_PIPELINES = (("StableDiffusion3", "SD3"), ("Flux", "Flux"), ("StableCascade", "Stable Cascade"),
                         ("PixArt", "PixArt"), ("Kandinsky", "Kandinsky"), ("StableDiffusionXLControlNet", "SDXL ControlNet"))
MARBLE_FIELDS = ("name", "default_width", "default_height", "max_pixels", "default_steps", "default_cfg",
                 "default_sampler")


def is_diffusers_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def _json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def _refuse(path: Path, what: str, found, supported) -> None:
    raise ModelLoadError(f"{path}: unsupported {what} {found!r} (marble supports {supported})")


def _require(path: Path, cfg: dict, expected: dict) -> None:
    """Settings marble's networks hard-wire: refuse a config that asks for anything else."""
    for key, ok in expected.items():
        value = cfg.get(key, ok[0])
        if value not in ok:
            _refuse(path, f"{key} =", value, " or ".join(repr(v) for v in ok))


# --- configs: diffusers -> marble ------------------------------------------------------------------

def unet_config_from_diffusers(cfg: dict, path: Path) -> UNetConfig:
    _require(path, cfg, {
        "center_input_sample": (False,), "flip_sin_to_cos": (True,), "freq_shift": (0,), "act_fn": ("silu",),
        "mid_block_type": ("UNetMidBlock2DCrossAttn",), "norm_eps": (1e-5,), "downsample_padding": (1,),
        "mid_block_scale_factor": (1, 1.0), "only_cross_attention": (False,), "dual_cross_attention": (False,),
        "class_embed_type": (None,), "addition_embed_type": (None, "text_time"), "encoder_hid_dim": (None,),
        "time_cond_proj_dim": (None,), "resnet_time_scale_shift": ("default",), "time_embedding_type": ("positional",),
        "conv_in_kernel": (3,), "conv_out_kernel": (3,), "num_class_embeds": (None,), "time_embedding_dim": (None,),
        "resnet_out_scale_factor": (1, 1.0), "attention_type": ("default",)})
    down = list(cfg.get("down_block_types", ()))
    up = list(cfg.get("up_block_types", ()))
    for kind in down:
        if kind not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            _refuse(path, "down block", kind, "CrossAttnDownBlock2D, DownBlock2D")
    mirrored = [k.replace("Down", "Up") for k in reversed(down)]
    if up != mirrored:
        _refuse(path, "up_block_types", up, f"the mirror of the down blocks, {mirrored}")
    widths = [int(w) for w in cfg["block_out_channels"]]
    base = widths[0]
    if any(w % base for w in widths):
        _refuse(path, "block_out_channels", widths, "multiples of the first width")
    attention = tuple(i for i, kind in enumerate(down) if kind.startswith("CrossAttn"))
    depth = cfg.get("transformer_layers_per_block", 1)
    level_depths: tuple[int, ...] = ()
    if isinstance(depth, (list, tuple)):
        if len(depth) != len(widths) or any(isinstance(d, (list, tuple)) for d in depth):
            _refuse(path, "transformer_layers_per_block", depth, "one depth per level")
        # canonical form: one depth when the transformers all have it, else per level (0 where none)
        used = {int(depth[i]) for i in (*attention, len(widths) - 1)}
        if len(used) == 1:
            depth = used.pop()
        else:
            level_depths = tuple(int(d) if i in attention else 0 for i, d in enumerate(depth))
            level_depths = level_depths[:-1] + (int(depth[-1]),)   # the middle block reads the last level's
            depth = 1
    # diffusers' `attention_head_dim` is a head *count* for SD (num_attention_heads falls back to it)
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    num_heads, head_dim = 8, 0
    if isinstance(heads, (list, tuple)):
        used = [*attention, len(widths) - 1]     # the mid block uses the deepest level's count
        dims = {widths[i] // heads[i] for i in used}
        counts = {heads[i] for i in used}
        if len(dims) == 1 and all(widths[i] % heads[i] == 0 for i in used):
            head_dim = dims.pop()
        elif len(counts) == 1:
            num_heads = counts.pop()
        else:
            _refuse(path, "attention heads", heads, "a fixed head count or a fixed head width")
    else:
        num_heads = int(heads)
    cross = cfg.get("cross_attention_dim", 1280)
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    adm = int(cfg.get("projection_class_embeddings_input_dim") or 0) if cfg.get("addition_embed_type") else 0
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4), model_channels=base,
        channel_mult=tuple(w // base for w in widths), num_res_blocks=cfg.get("layers_per_block", 2),
        attention_levels=attention, num_heads=num_heads, head_dim=head_dim, context_dim=int(cross),
        transformer_depth=int(depth), level_depths=level_depths, adm_in_channels=adm,
        linear_projection=bool(cfg.get("use_linear_projection", False)),
        groups=cfg.get("norm_num_groups", 32), dropout=float(cfg.get("dropout", 0.0)))


def vae_config_from_diffusers(cfg: dict, path: Path, xl: bool = False) -> VAEConfig:
    """`xl`: an SDXL pipeline, whose VAE runs in float32 under fp16 unless its config says it need
    not (force_upcast false: the fp16-fix VAE)."""
    _require(path, cfg, {"act_fn": ("silu",), "use_quant_conv": (True,), "use_post_quant_conv": (True,),
                         "latents_mean": (None,), "latents_std": (None,)})
    for kind in cfg.get("down_block_types", ()):
        if kind != "DownEncoderBlock2D":
            _refuse(path, "VAE down block", kind, "DownEncoderBlock2D")
    for kind in cfg.get("up_block_types", ()):
        if kind != "UpDecoderBlock2D":
            _refuse(path, "VAE up block", kind, "UpDecoderBlock2D")
    widths = [int(w) for w in cfg.get("block_out_channels", (64,))]
    if any(w % widths[0] for w in widths):
        _refuse(path, "VAE block_out_channels", widths, "multiples of the first width")
    return VAEConfig(
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3), ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths), num_res_blocks=cfg.get("layers_per_block", 1),
        z_channels=cfg.get("latent_channels", 4), groups=cfg.get("norm_num_groups", 32),
        mid_attention=bool(cfg.get("mid_block_add_attention", True)),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)), shift_factor=float(cfg.get("shift_factor") or 0.0),
        decode_fp32=xl and bool(cfg.get("force_upcast", True)))


def text_config_from_diffusers(cfg: dict, pad_id: int, path: Path) -> CLIPTextConfig:
    if cfg.get("model_type", "clip_text_model") not in ("clip_text_model",):
        _refuse(path, "text encoder", cfg.get("model_type"), "CLIPTextModel")
    try:
        return CLIPTextConfig(
            vocab_size=cfg.get("vocab_size", 49408), max_tokens=cfg.get("max_position_embeddings", 77),
            width=cfg.get("hidden_size", 512), layers=cfg.get("num_hidden_layers", 12),
            heads=cfg.get("num_attention_heads", 8), mlp_dim=cfg.get("intermediate_size", 2048),
            activation=cfg.get("hidden_act", "quick_gelu"), layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
            pad_id=pad_id)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None


def schedule_from_diffusers(cfg: dict, path: Path) -> tuple[dict, str]:
    _require(path, cfg, {"trained_betas": (None,)})
    kind = cfg.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES:
        _refuse(path, "beta_schedule", kind, ", ".join(BETA_SCHEDULES))
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        _refuse(path, "prediction_type", prediction, ", ".join(PREDICTIONS))
    schedule = {"name": BETA_SCHEDULES[kind], "n": int(cfg.get("num_train_timesteps", 1000))}
    if kind != "squaredcos_cap_v2":
        schedule.update(beta_start=float(cfg.get("beta_start", 0.0001)), beta_end=float(cfg.get("beta_end", 0.02)))
    if cfg.get("rescale_betas_zero_snr", False):
        schedule["zero_terminal_snr"] = True
    return schedule, PREDICTIONS[prediction]


def tokenizer_pad_id(folder: Path) -> int:
    """The pad token of the folder's CLIP tokenizer: <|endoftext|> for SD1 (49407), "!" for SD2 (0).
    marble tokenizes with its own copy of CLIP's vocabulary, so a different vocabulary is refused."""
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            cfg = {**_json(folder / name), **cfg}
    pad = cfg.get("pad_token", CLIP_EOS)
    pad = pad.get("content", CLIP_EOS) if isinstance(pad, dict) else pad
    vocab = clip_vocab(read_clip_merges())
    theirs = None
    if (folder / "vocab.json").is_file():
        theirs = _json(folder / "vocab.json")
    elif (folder / "tokenizer.json").is_file():
        theirs = _json(folder / "tokenizer.json").get("model", {}).get("vocab")
    if theirs is not None and len(theirs) != len(vocab):
        raise ModelLoadError(f"{folder}: the tokenizer has {len(theirs)} tokens; marble reads only CLIP's "
                             f"{len(vocab)}-token vocabulary (added tokens are not supported)")
    if pad not in vocab:
        raise ModelLoadError(f"{folder}: unknown pad token {pad!r}")
    return vocab[pad]


# --- weights ---------------------------------------------------------------------------------------

def _component_source(folder: Path, component: str, allow_pickle: bool,
                      mapped: bool = False) -> tuple[TensorSource, list[Path]]:
    d = folder / component
    stem = WEIGHT_FILES[component]
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (d / name).is_file():
            return SafetensorsSource.open(d / name, mapped), [d / name]
    for name in (f"{stem}.safetensors.index.json", f"{stem}.fp16.safetensors.index.json"):
        if (d / name).is_file():
            shards = sorted(set(_json(d / name).get("weight_map", {}).values()))
            paths = [d / s for s in shards]
            for p in paths:
                if p.parent != d or not p.is_file():
                    raise ModelLoadError(f"{d / name} names a missing shard {p.name}")
            return SafetensorsSource([read_header(p) for p in paths], d / name, mapped), paths
    pickle = d / PICKLE_FILES[component]
    if pickle.is_file():
        return open_source(pickle, allow_pickle), [pickle]
    raise ModelLoadError(f"{d} has no weights ({stem}.safetensors)")


def _text_to_marble(name: str, tensor: torch.Tensor):
    if name.endswith("position_ids"):
        return []     # a constant buffer older transformers saved
    key = name if name.startswith("text_model.") else "text_model." + name
    return [("text_encoder." + key, tensor)]


def _xl_towers(folder: Path, index: dict) -> list[str]:
    """The text encoders an SDXL pipeline holds, in checkpoint order (the refiner: text_encoder_2 alone)."""
    return [c for c, _ in SDXL_TOWERS if isinstance(index.get(c), list) and index[c][0] is not None]


def _xl_text_config(folder: Path, towers: list[str]) -> CLIPConcatConfig:
    configs = []
    for component, tokenizer in SDXL_TOWERS:
        if component not in towers:
            continue
        path = folder / component / "config.json"
        cfg = _json(path)
        pad_id = tokenizer_pad_id(folder / tokenizer) if (folder / tokenizer).is_dir() else 49407
        # SDXL reads hidden state -2 raw; text_encoder_2 is CLIPTextModelWithProjection and pools
        c = text_config_from_diffusers(cfg, pad_id, path).replace(
            clip_skip=2, final_norm=False,
            projection_dim=int(cfg.get("projection_dim", 512)) if component == "text_encoder_2" else 0)
        configs.append(c)
    try:
        return CLIPConcatConfig(tuple(configs))
    except ValueError as e:
        raise ModelLoadError(f"{folder}: {e}") from None


def _xl_vector(folder: Path, index: dict, unet_cfg: dict, unet: UNetConfig, text: CLIPConcatConfig) -> VectorConditioning:
    vector = VectorConditioning(micro="aesthetic" if index.get("requires_aesthetics_score") else "size",
                                fourier_dim=int(unet_cfg.get("addition_time_embed_dim") or 256),
                                zero_empty_negative=bool(index.get("force_zeros_for_empty_prompt", True)))
    want = text.encoders[-1].projection_dim + vector.numbers() * vector.fourier_dim
    if unet.adm_in_channels != want:
        raise ModelLoadError(f"{folder}: the U-Net's projection_class_embeddings_input_dim is {unet.adm_in_channels}, "
                             f"but pooled text + {vector.numbers()} size numbers make {want}")
    return vector


def refuse_unsupported_pipeline(folder: Path, index: dict) -> None:
    name = str(index.get("_class_name", ""))
    for fragment, family in UNSUPPORTED_PIPELINES:
        if fragment in name:
            raise ModelLoadError(f"{folder}: this looks like an {family} pipeline ({name}); "
                                 "marble loads SD1.x, SD2.x and SDXL")


def _tower_to_marble(i: int):
    """An SDXL pipeline's text_encoder(_2)/ keys -> marble's text_encoder.encoders.i.*."""
    def to_marble(name: str, tensor: torch.Tensor):
        if name.endswith("position_ids"):
            return []
        if name.startswith("text_projection."):
            return [(f"text_encoder.encoders.{i}.{name}", tensor)]
        key = name if name.startswith("text_model.") else "text_model." + name
        return [(f"text_encoder.encoders.{i}.{key}", tensor)]
    return to_marble


def read_diffusers(folder: Path, dtype: torch.dtype | None = None, allow_pickle: bool = False,
                   mapped: bool = False) -> Checkpoint:
    folder = Path(folder)
    index = _json(folder / "model_index.json")
    refuse_unsupported_pipeline(folder, index)
    xl = "text_encoder_2" in index or "XL" in str(index.get("_class_name", ""))
    towers = _xl_towers(folder, index) if xl else ["text_encoder"]
    for component in ("unet", "vae", *towers, "scheduler"):
        if not (folder / component).is_dir():
            raise ModelLoadError(f"{folder} has no {component}/ folder")
    unet_cfg = _json(folder / "unet" / "config.json")
    unet = unet_config_from_diffusers(unet_cfg, folder / "unet" / "config.json")
    if bool(unet_cfg.get("addition_embed_type")) != xl or bool(unet.adm_in_channels) != xl:   # SDXL pipelines only, and they need it
        _refuse(folder / "unet" / "config.json", "addition_embed_type =", unet_cfg.get("addition_embed_type"),
                "'text_time' with projection_class_embeddings_input_dim in SDXL pipelines, None otherwise")
    vae = vae_config_from_diffusers(_json(folder / "vae" / "config.json"), folder / "vae" / "config.json", xl)
    if xl:
        text = _xl_text_config(folder, towers)
        vector = _xl_vector(folder, index, unet_cfg, unet, text)
    else:
        pad_id = tokenizer_pad_id(folder / "tokenizer") if (folder / "tokenizer").is_dir() else 49407
        text = text_config_from_diffusers(_json(folder / "text_encoder" / "config.json"), pad_id,
                                          folder / "text_encoder" / "config.json")
        vector = None
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    schedule, prediction = schedule_from_diffusers(_json(scheduler_file), scheduler_file)
    extra = index.get("_marble") if isinstance(index.get("_marble"), dict) else {}
    text_dict = config_to_dict(text)
    try:   # marble's own text settings (clip skip; the preset spelling) when they fit this encoder
        ours = text_config_from_dict(extra["text"])
        if ours == text or (isinstance(ours, CLIPTextConfig) and ours.replace(clip_skip=1) == text):
            text_dict = extra["text"]
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    sample = _json(folder / "unet" / "config.json").get("sample_size", 64)
    side = int(sample if isinstance(sample, int) else sample[0]) * vae.downsampling_factor
    fields = {"name": folder.name, "default_width": side, "default_height": side,
              **{k: extra[k] for k in MARBLE_FIELDS if k in extra}}
    try:
        config = LatentDiffusionConfig(unet=unet, vae=vae, text=text_dict, schedule=schedule,
                                       prediction=prediction, vector=vector, **fields)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{folder}: invalid settings ({e})") from None

    expected = expected_state(config)
    state, files = {}, []
    unet_back, vae_back = inverse(unet_table(unet)), vae_reverse_table(vae)
    unet_fwd, vae_fwd = unet_table(unet), vae_table(vae)

    def unet_to_marble(name, t):
        key = rename(name, unet_back)
        return None if key is None else [("unet." + key, t)]

    def vae_to_marble(name, t):
        key = rename(name, vae_back)
        return None if key is None else [("vae." + key, vae_from_diffusers_tensor(key, t))]

    texts = [(c, _text_to_marble) for c in towers] if not xl else \
        [(c, _tower_to_marble(i)) for i, c in enumerate(towers)]
    for component, to_marble, forward in (("unet", unet_to_marble, unet_fwd), ("vae", vae_to_marble, vae_fwd),
                                          *((c, fn, None) for c, fn in texts)):
        source, paths = _component_source(folder, component, allow_pickle, mapped)
        files += paths
        prefix = component + "." if not (xl and component.startswith("text_encoder")) else \
            f"text_encoder.encoders.{towers.index(component)}."
        part = {k: v for k, v in expected.items() if k.startswith(prefix)}

        def describe(key, prefix=prefix, forward=forward, component=component):
            inner = key[len(prefix):]
            return f"{component}/{rename(inner, forward) if forward else inner}"

        state.update(convert_state(source, to_marble, part, dtype, describe))
    return Checkpoint(config, state, folder, file_hash(*files), "diffusers")


# --- configs: marble -> diffusers ------------------------------------------------------------------

def unet_config_to_diffusers(c: UNetConfig, sample_size: int, vector: VectorConditioning | None = None) -> dict:
    if c.coord_channels or c.attention_position:
        raise ValueError("this U-Net has explicit position inputs; diffusers' UNet2DConditionModel has none")
    if c.pruned:
        raise ValueError("this U-Net is pruned (fewer decoder blocks or no middle block); "
                         "diffusers' UNet2DConditionModel always has layers_per_block + 1 up blocks")
    levels = range(len(c.channel_mult))
    widths = [c.model_channels * m for m in c.channel_mult]
    heads = [c.heads_and_dim(w)[0] for w in widths]
    down = ["CrossAttnDownBlock2D" if i in c.attention_levels else "DownBlock2D" for i in levels]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size, "in_channels": c.in_channels, "out_channels": c.out_channels,
        "down_block_types": down, "up_block_types": [k.replace("Down", "Up") for k in reversed(down)],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": widths,
        "layers_per_block": c.num_res_blocks, "cross_attention_dim": c.context_dim,
        "attention_head_dim": heads if c.head_dim else c.num_heads,   # diffusers' name for the head count
        # levels without transformers get 1, as the released SDXL config has it (diffusers ignores them)
        "transformer_layers_per_block": [d or 1 for d in c.level_depths] if c.level_depths else c.transformer_depth,
        "use_linear_projection": c.linear_projection,
        "norm_num_groups": c.groups, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
        "center_input_sample": False, "downsample_padding": 1, "dropout": c.dropout, "upcast_attention": False,
        **({"addition_embed_type": "text_time", "addition_time_embed_dim": vector.fourier_dim,
            "projection_class_embeddings_input_dim": c.adm_in_channels} if vector is not None else {}),
    }


def vae_config_to_diffusers(c: VAEConfig, sample_size: int, xl: bool = False) -> dict:
    n = len(c.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": sample_size,
        "in_channels": c.in_channels, "out_channels": c.out_channels, "latent_channels": c.z_channels,
        "block_out_channels": [c.ch * m for m in c.ch_mult], "layers_per_block": c.num_res_blocks,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "norm_num_groups": c.groups, "act_fn": "silu", "scaling_factor": c.scaling_factor,
        "shift_factor": c.shift_factor or None, "mid_block_add_attention": c.mid_attention,
        "force_upcast": c.decode_fp32 if xl else True,   # read only by SDXL pipelines
    }


def text_config_to_diffusers(c: CLIPTextConfig) -> dict:
    return {
        "architectures": ["CLIPTextModelWithProjection" if c.projection_dim else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_tokens, "hidden_size": c.width, "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads, "intermediate_size": c.mlp_dim, "hidden_act": c.activation,
        "layer_norm_eps": c.layer_norm_eps, "projection_dim": c.projection_dim or c.width, "bos_token_id": 49406,
        "eos_token_id": 49407, "pad_token_id": c.pad_id, "attention_dropout": 0.0, "dropout": 0.0,
        "initializer_factor": 1.0, "initializer_range": 0.02, "torch_dtype": "float32",
    }


def scheduler_config_to_diffusers(config: LatentDiffusionConfig) -> dict:
    s = dict(config.schedule)
    kind = {v: k for k, v in BETA_SCHEDULES.items()}.get(s.pop("name"))
    if kind is None:
        raise ValueError(f"the schedule {config.schedule} has no diffusers equivalent")
    out = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
           "beta_schedule": kind, "num_train_timesteps": s.pop("n", 1000),
           "prediction_type": {v: k for k, v in PREDICTIONS.items()}[config.prediction],
           "timestep_spacing": "linspace", "steps_offset": 1, "interpolation_type": "linear",
           "trained_betas": None, "rescale_betas_zero_snr": bool(s.pop("zero_terminal_snr", False))}
    if kind == "squaredcos_cap_v2":
        if s not in ({}, {"s": 0.008, "max_beta": 0.999}):
            raise ValueError(f"cosine schedule options {s} have no diffusers equivalent")
    else:
        out.update(beta_start=s.pop("beta_start"), beta_end=s.pop("beta_end"))
    return out


def tokenizer_files(pad_id: int, max_tokens: int) -> dict[str, str]:
    """transformers' CLIPTokenizer files for marble's shipped vocabulary (OpenAI's recipe)."""
    merges = read_clip_merges()
    vocab = clip_vocab(merges)
    pad = {v: k for k, v in vocab.items()}[pad_id]
    specials = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": pad}
    assert len(bytes_to_unicode()) == 256
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_tokens,
                                             "do_lower_case": True, "errors": "replace", **specials}, indent=2),
    }


def write_diffusers(ckpt: Checkpoint, folder: Path) -> Path:
    """A diffusers pipeline folder; built in a temporary sibling folder and renamed into place."""
    folder = Path(folder)
    config = ckpt.config
    if folder.exists():
        raise FileExistsError(f"{folder} exists; marble never overwrites a model")
    if text_is_external(config):
        raise ValueError("this model's text encoder is not CLIP; it has no diffusers layout")
    if not isinstance(config.unet, UNetConfig):
        raise ValueError("this model's denoiser is not a U-Net; it has no diffusers UNet2DConditionModel layout")
    text = text_config_from_dict(config.text)
    if isinstance(text, CLIPConcatConfig):   # SDXL: the last tower is text_encoder_2 (the refiner has only it)
        names = SDXL_TOWERS[len(SDXL_TOWERS) - len(text.encoders):]
        towers = [(c, tok, tower, f"text_encoder.encoders.{i}.") for i, ((c, tok), tower)
                  in enumerate(zip(names, text.encoders))]
    elif isinstance(text, CLIPTextConfig):
        towers = [("text_encoder", "tokenizer", text, "text_encoder.")]
    else:
        raise ValueError("this model's text encoder is not CLIP; it has no diffusers layout")
    factor = config.latent_factor
    unet_fwd, vae_fwd = unet_table(config.unet), vae_table(config.vae)
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, **{c: {} for c, *_ in towers}}
    for key, t in ckpt.state.items():
        component, inner = key.split(".", 1)
        if component == "unet":
            parts["unet"][rename(inner, unet_fwd)] = t
        elif component == "vae":
            parts["vae"][rename(inner, vae_fwd)] = vae_to_diffusers_tensor(key[4:], t)
        else:
            name, prefix = next((c, p) for c, _, _, p in towers if key.startswith(p))
            parts[name][key[len(prefix):]] = t
    index = {
        "_class_name": "StableDiffusionInpaintPipeline" if config.unet.in_channels == 9 else "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
        "_marble": {**{k: getattr(config, k) for k in MARBLE_FIELDS}, "text": config.text},
    }
    if config.vector is not None:
        refiner = config.vector.micro == "aesthetic"
        index.update({"_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
                      "image_encoder": [None, None], "force_zeros_for_empty_prompt": config.vector.zero_empty_negative,
                      **{k: [None, None] for pair in SDXL_TOWERS for k in pair}})
        del index["safety_checker"], index["requires_safety_checker"]
        if refiner:
            index["requires_aesthetics_score"] = True
    for component, tokenizer, tower, _ in towers:
        index[component] = ["transformers", "CLIPTextModelWithProjection" if tower.projection_dim else "CLIPTextModel"]
        index[tokenizer] = ["transformers", "CLIPTokenizer"]
    jsons = {
        "model_index.json": index,
        "unet/config.json": unet_config_to_diffusers(config.unet, config.default_height // factor, config.vector),
        "vae/config.json": vae_config_to_diffusers(config.vae, config.default_height, config.vector is not None),
        **{f"{c}/config.json": text_config_to_diffusers(tower) for c, _, tower, _ in towers},
        "scheduler/scheduler_config.json": scheduler_config_to_diffusers(config),
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for rel, data in jsons.items():
            (tmp / rel).parent.mkdir(exist_ok=True)
            (tmp / rel).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for _, tokenizer, tower, _ in towers:
            (tmp / tokenizer).mkdir()
            for name, text_data in tokenizer_files(tower.pad_id, tower.max_tokens).items():
                (tmp / tokenizer / name).write_text(text_data, encoding="utf-8")
        for component, tensors in parts.items():
            write = safetensors_writer(tensors, {"format": "pt"})
            with open(tmp / component / f"{WEIGHT_FILES[component]}.safetensors", "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, folder)   # atomic; fails rather than replace a non-empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
