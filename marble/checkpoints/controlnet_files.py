"""ControlNet files: lllyasviel's single files, diffusers ControlNetModel folders and single files,
and marble's own (safetensors with its ControlNetConfig in the metadata).

  lllyasviel 1.0/1.1: `control_model.input_hint_block.*`, `control_model.zero_convs.N.0.*`,
      `control_model.middle_block_out.0.*` and the copied encoder under its ldm names; some files
      (the 1.1 releases, A1111 extractions) drop the `control_model.` prefix. marble's names are
      these, so loading is a key copy.
  diffusers: `controlnet_cond_embedding.*`, `controlnet_down_blocks.N`, `controlnet_mid_block` and
      the encoder under UNet2DConditionModel's names (renamed through diffusers_keys.controlnet_table);
      a folder holds config.json + diffusion_pytorch_model.safetensors.
Tensors say nothing of attention heads or GroupNorm groups: loaded for a model, a ControlNet takes
them from that U-Net (`fit`; it was copied from one of its kind); read alone (conversion), a file
without a config gets SD's convention (8 heads with 1×1-conv projections, 64-channel heads with
linear ones; 32 groups), which a converted config.json then states.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from marble.checkpoints.checkpoint import (PICKLE_SUFFIXES, TensorSource, config_from_metadata,
                                           convert_state, file_hash, open_source, refuse_existing)
from marble.checkpoints.diffusers_folder import DIFFUSERS_VERSION, unet_config_from_diffusers, unet_config_to_diffusers
from marble.checkpoints.diffusers_keys import controlnet_table, inverse, rename
from marble.config import config_to_json
from marble.errors import ModelLoadError
from marble.fileio import write_new
from marble.models.controlnet import ControlNet, ControlNetConfig
from marble.models.skeleton import skeleton
from marble.models.unet import UNetConfig
from marble.tensor_file import read_header, safetensors_writer

FORMAT = "marble-controlnet"
PREFIX = "control_model."
LAYOUTS = ("marble", "diffusers", "single-file")   # single-file: lllyasviel's layout
WEIGHTS = "diffusion_pytorch_model"


@dataclass
class ControlNetFile:
    config: ControlNetConfig
    state: dict[str, torch.Tensor]     # marble (lllyasviel) keys without the prefix, stored dtypes
    source: Path
    hash: str                          # first 10 hex of the file's sha256 (A1111's short hash)
    kind: str                          # "marble" | "diffusers" | "single-file"

    @property
    def name(self) -> str:
        return self.source.stem if self.source.is_file() else self.source.name


# --- recognising a ControlNet ----------------------------------------------------------------------

def _is_diffusers_keys(keys) -> bool:
    return any(k.startswith("controlnet_cond_embedding.") for k in keys)


def _is_lllyasviel_keys(keys) -> bool:
    return any(k.startswith(("input_hint_block.", PREFIX + "input_hint_block.")) for k in keys)


def is_controlnet(path: Path) -> bool:
    """A diffusers ControlNetModel folder, or a safetensors file of ControlNet keys (or marble's).
    Pickles are not opened here: that takes the user's consent (`read_controlnet(allow_pickle=True)`)."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        try:
            return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "ControlNetModel"
        except (OSError, ValueError):
            return False
    if not path.is_file() or path.suffix.lower() in PICKLE_SUFFIXES:
        return False
    try:
        header = read_header(path)
    except ModelLoadError:
        return False
    keys = header.entries
    return header.metadata.get("format") == FORMAT or _is_lllyasviel_keys(keys) or _is_diffusers_keys(keys)


def holds_controlnet(path: Path, allow_pickle: bool = False) -> bool:
    """is_controlnet, and for a pickle the user allowed: whether its tensors are a ControlNet's."""
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            return False
        keys = open_source(path, True).shapes()
        return _is_lllyasviel_keys(keys) or _is_diffusers_keys(keys)
    return is_controlnet(path)


# --- the shape from the tensors --------------------------------------------------------------------

def _blocks(shapes: dict, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for m in map(rx.match, shapes) if m}


def _hint_widths(shapes: dict, conv: str, path: Path) -> tuple[int, tuple[int, ...], int]:
    """(hint channels, hint widths, convolutions) from input_hint_block's (or the cond embedding's) convs."""
    first = shapes.get(conv.format(0))
    if first is None:
        raise ModelLoadError(f"{path} has no hint encoder ({conv.format(0)})")
    n = 1
    while conv.format(2 * n) in shapes:   # the convolutions sit at even indices (SiLUs between)
        n += 1
    hint_channels, widths = first[1], [first[0]]
    for k in range(2, n - 1, 2):          # convolution k = 2, 4, ... (stride 2) widens
        widths.append(shapes[conv.format(2 * k)][0])
    return hint_channels, tuple(widths), n


def _unet_shape(in_channels: int, base: int, widths: list[int], res: int, depths: list[int], mid_depth: int,
                context: int, linear: bool, adm: int) -> UNetConfig:
    """A UNetConfig from structure; heads by SD's convention (module docstring)."""
    attention = tuple(i for i, d in enumerate(depths) if d)
    used = {depths[i] for i in attention} | {mid_depth}
    if len(used) == 1:   # one depth everywhere (SD1, SD2)
        depth, level_depths = used.pop(), ()
    else:                # per level, the middle block's last (SDXL base: 0, 2, 10)
        depth, level_depths = 1, tuple(depths[:-1]) + (mid_depth,)
    if any(w % base for w in widths):
        raise ValueError(f"level widths {widths} are not multiples of {base}")
    return UNetConfig(in_channels=in_channels, out_channels=in_channels, model_channels=base,
                      channel_mult=tuple(w // base for w in widths), num_res_blocks=res, attention_levels=attention,
                      num_heads=8, head_dim=64 if linear and all(w % 64 == 0 for w in widths) else 0, context_dim=context, transformer_depth=depth,
                      level_depths=level_depths, adm_in_channels=adm, linear_projection=linear,
                      groups=32 if all(w % 32 == 0 for w in widths) else 8)


def infer_lllyasviel(shapes: dict, path: Path) -> ControlNetConfig:
    """The ControlNetConfig an lllyasviel-layout state (no prefix) describes."""
    hint_channels, hint, _ = _hint_widths(shapes, "input_hint_block.{}.weight", path)
    conv_in = shapes["input_blocks.0.0.weight"]
    base, in_channels = conv_in[0], conv_in[1]
    blocks = max(_blocks(shapes, r"input_blocks\.(\d+)\.")) + 1
    downs = sorted(i for i in range(blocks) if f"input_blocks.{i}.0.op.weight" in shapes)
    levels = len(downs) + 1
    res = (blocks - 1 - len(downs)) // levels
    widths, depths, i = [], [], 1
    context, linear = 0, False
    for level in range(levels):
        widths.append(shapes[f"input_blocks.{i}.0.in_layers.2.weight"][0])
        depths.append(len(_blocks(shapes, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")))
        if depths[-1]:
            context = shapes[f"input_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight"][1]
            linear = len(shapes[f"input_blocks.{i}.1.proj_in.weight"]) == 2
        i += res + (level < levels - 1)
    mid = len(_blocks(shapes, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    adm = shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else 0
    unet = _unet_shape(in_channels, base, widths, res, depths, mid, context, linear, adm)
    return ControlNetConfig(unet, hint_channels, hint)


def infer_diffusers(shapes: dict, path: Path) -> ControlNetConfig:
    """The ControlNetConfig a diffusers ControlNetModel state describes (single files have no config.json)."""
    hint_convs = {"input_hint_block.0.weight": shapes.get("controlnet_cond_embedding.conv_in.weight")}
    for k in _blocks(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight"):
        hint_convs[f"input_hint_block.{2 * k + 2}.weight"] = shapes[f"controlnet_cond_embedding.blocks.{k}.weight"]
    hint_convs[f"input_hint_block.{2 * len(hint_convs)}.weight"] = shapes.get("controlnet_cond_embedding.conv_out.weight")
    hint_channels, hint, _ = _hint_widths({k: v for k, v in hint_convs.items() if v is not None},
                                          "input_hint_block.{}.weight", path)
    conv_in = shapes["conv_in.weight"]
    base, in_channels = conv_in[0], conv_in[1]
    levels = max(_blocks(shapes, r"down_blocks\.(\d+)\.")) + 1
    res = len(_blocks(shapes, r"down_blocks\.0\.resnets\.(\d+)\."))
    widths, depths, context, linear = [], [], 0, False
    for level in range(levels):
        widths.append(shapes[f"down_blocks.{level}.resnets.0.conv1.weight"][0])
        depths.append(len(_blocks(shapes, rf"down_blocks\.{level}\.attentions\.0\.transformer_blocks\.(\d+)\.")))
        if depths[-1]:
            context = shapes[f"down_blocks.{level}.attentions.0.transformer_blocks.0.attn2.to_k.weight"][1]
            linear = len(shapes[f"down_blocks.{level}.attentions.0.proj_in.weight"]) == 2
    mid = len(_blocks(shapes, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."))
    adm = shapes["add_embedding.linear_1.weight"][1] if "add_embedding.linear_1.weight" in shapes else 0
    unet = _unet_shape(in_channels, base, widths, res, depths, mid, context, linear, adm)
    return ControlNetConfig(unet, hint_channels, hint)


def interface(c: UNetConfig) -> tuple:
    """What must agree between a ControlNet and the U-Net it feeds: the residuals' number and widths
    (model width, level widths, res blocks per level) and the inputs both read (the text context,
    SDXL's vector y). The copy's own transformers may differ (SDXL's "small" ControlNets are shallower)."""
    return c.model_channels, c.channel_mult, c.num_res_blocks, c.context_dim, c.adm_in_channels


def fit(config: ControlNetConfig, unet: UNetConfig, name: str) -> ControlNetConfig:
    """The ControlNet config to run beside this U-Net, or a one-line ModelLoadError when its residuals
    or inputs would not match (a ControlNet for another architecture). The copy keeps its own
    transformers (levels, depths, projections: the tensors say); what tensors do not say, it shares
    with the U-Net it was copied from: attention heads, groups, position options."""
    ours, theirs = interface(config.unet), interface(unet)
    if ours != theirs:
        fields = ("model width", "level widths", "res blocks per level", "context width", "vector conditioning width")
        diff = next(f"{f} {a} vs the model's {b}" for f, a, b in zip(fields, ours, theirs) if a != b)
        raise ModelLoadError(f"the ControlNet {name} does not fit this model's U-Net ({diff}); "
                             "a ControlNet works only with the architecture it was trained for")
    in_channels = config.unet.in_channels
    if unet.coord_channels and not config.unet.coord_channels:   # read from tensors: the input conv counts x, y too
        in_channels -= 2
    return replace(config, unet=replace(config.unet, in_channels=in_channels, out_channels=in_channels,
                                        num_heads=unet.num_heads, head_dim=unet.head_dim, groups=unet.groups,
                                        dropout=unet.dropout, coord_channels=unet.coord_channels,
                                        attention_position=unet.attention_position))


# --- reading ---------------------------------------------------------------------------------------

def expected_controlnet(config: ControlNetConfig) -> dict[str, torch.Tensor]:
    with skeleton():
        return dict(ControlNet(config).state_dict())


def _lllyasviel_to_marble(prefixed: bool):
    def to_marble(name: str, t: torch.Tensor):
        if prefixed:
            if not name.startswith(PREFIX):
                return [] if name.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) \
                    or name in ("lvlb_weights", "logvar") else None
            name = name[len(PREFIX):]
        return [(name, t)]
    return to_marble


def _diffusers_to_marble(table: dict[str, str]):
    def to_marble(name: str, t: torch.Tensor):
        ours = rename(name, table)
        return None if ours is None else [(ours, t)]
    return to_marble


def _hint_convs(config: ControlNetConfig) -> int:
    return 2 * len(config.hint_block)


def read_controlnet(path: Path | str, *, dtype: torch.dtype | None = None, allow_pickle: bool = False,
                    unet: UNetConfig | None = None) -> ControlNetFile:
    """Any ControlNet file or folder into marble keys; with `unet`, fitted to that U-Net (`fit`).
    One-line ModelLoadError for a missing, corrupt, unrecognised or misfitting file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"no ControlNet file at {path}")
    if path.is_dir():
        return _read_diffusers_folder(path, dtype, allow_pickle, unet)
    source = open_source(path, allow_pickle)
    shapes = {k: tuple(s) for k, (s, _) in source.shapes().items()}
    meta = getattr(source, "headers", [None])[0]
    try:
        if meta is not None and meta.metadata.get("format") == FORMAT:
            config = config_from_metadata(path, meta.metadata.get("config"), ControlNetConfig, "marble ControlNet")
            to_marble, describe, kind = _lllyasviel_to_marble(False), lambda k: k, "marble"
        elif _is_lllyasviel_keys(shapes):
            prefixed = any(k.startswith(PREFIX) for k in shapes)
            inner = {k[len(PREFIX):]: s for k, s in shapes.items() if k.startswith(PREFIX)} if prefixed else shapes
            config = infer_lllyasviel(inner, path)
            to_marble, kind = _lllyasviel_to_marble(prefixed), "single-file"
            describe = (lambda k: PREFIX + k) if prefixed else (lambda k: k)
        elif _is_diffusers_keys(shapes):
            config = infer_diffusers(shapes, path)
            table = controlnet_table(config.unet, _hint_convs(config))
            to_marble, kind = _diffusers_to_marble(inverse(table)), "diffusers"
            describe = lambda k: rename(k, table) or k   # noqa: E731
        else:
            raise ModelLoadError(f"{path} is not a ControlNet (no input_hint_block.* or controlnet_cond_embedding.* keys)")
    except (KeyError, ValueError, IndexError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{path}: the ControlNet's tensors do not describe a U-Net encoder ({e})") from None
    return _finish(source, config, to_marble, describe, kind, dtype, unet, [path])


def _finish(source: TensorSource, config: ControlNetConfig, to_marble, describe, kind: str, dtype, unet,
            files: list[Path]) -> ControlNetFile:
    if unet is not None:
        config = fit(config, unet, source.path.name)
    state = convert_state(source, to_marble, expected_controlnet(config), dtype, describe)
    return ControlNetFile(config, state, source.path, file_hash(*files), kind)


def controlnet_config_from_diffusers(cfg: dict, path: Path) -> ControlNetConfig:
    down = list(cfg.get("down_block_types", ()))
    unet_cfg = {k: v for k, v in cfg.items() if k not in ("conditioning_channels", "conditioning_embedding_out_channels",
                                                           "controlnet_conditioning_channel_order",
                                                           "global_pool_conditions", "addition_embed_type_num_heads")}
    unet_cfg["up_block_types"] = [k.replace("Down", "Up") for k in reversed(down)]
    if cfg.get("global_pool_conditions"):
        raise ModelLoadError(f"{path}: global_pool_conditions (shuffle ControlNets) is not supported")
    if cfg.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise ModelLoadError(f"{path}: only RGB control images are supported")
    unet = unet_config_from_diffusers(unet_cfg, path)
    unet = replace(unet, out_channels=unet.in_channels)
    hint = tuple(int(w) for w in cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256))
    return ControlNetConfig(unet, int(cfg.get("conditioning_channels", 3)), hint)


def _read_diffusers_folder(folder: Path, dtype, allow_pickle: bool, unet) -> ControlNetFile:
    config_path = folder / "config.json"
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder} is not a diffusers ControlNet folder (config.json: {e})") from None
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "ControlNetModel":
        raise ModelLoadError(f"{folder}/config.json is not a diffusers ControlNetModel config")
    config = controlnet_config_from_diffusers(cfg, folder)
    for name in (f"{WEIGHTS}.safetensors", f"{WEIGHTS}.fp16.safetensors", f"{WEIGHTS}.bin"):
        if (folder / name).is_file():
            weights = folder / name
            break
    else:
        raise ModelLoadError(f"{folder} has no weights ({WEIGHTS}.safetensors)")
    source = open_source(weights, allow_pickle)
    source.path = folder
    table = controlnet_table(config.unet, _hint_convs(config))
    return _finish(source, config, _diffusers_to_marble(inverse(table)), lambda k: rename(k, table) or k, "diffusers",
                   dtype, unet, [weights])


# --- writing ---------------------------------------------------------------------------------------

def controlnet_config_to_diffusers(c: ControlNetConfig) -> dict:
    unet = unet_config_to_diffusers(c.unet, 64)
    for key in ("sample_size", "out_channels", "up_block_types", "center_input_sample", "dropout"):
        unet.pop(key, None)
    if c.unet.adm_in_channels:
        unet.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=c.unet.adm_in_channels)
    return {**unet, "_class_name": "ControlNetModel", "_diffusers_version": DIFFUSERS_VERSION,
            "conditioning_channels": c.hint_channels, "conditioning_embedding_out_channels": list(c.hint_block),
            "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}


def write_controlnet(cn: ControlNetFile, dst: Path | str, to: str, metadata: dict[str, str] | None = None) -> Path:
    """`to`: "marble" (config in the metadata), "single-file" (lllyasviel's, under control_model.) or
    "diffusers" (a new folder: config.json + diffusion_pytorch_model.safetensors). Atomic, never over a file.
    `metadata`: more string fields for a marble file (a trained one's base model and training)."""
    dst = refuse_existing(dst)
    if to == "marble":
        meta = {**(metadata or {}), "format": FORMAT, "config": config_to_json(cn.config)}
        return write_new(dst, safetensors_writer(cn.state, meta))
    if to == "single-file":
        state = {PREFIX + k: v for k, v in cn.state.items()}
        return write_new(dst, safetensors_writer(state, {"format": "pt"}))
    if to == "diffusers":
        table = controlnet_table(cn.config.unet, _hint_convs(cn.config))
        state = {rename(k, table): v for k, v in cn.state.items()}
        tmp = dst.with_name(dst.name + ".partial")
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(controlnet_config_to_diffusers(cn.config), indent=2), encoding="utf-8")
        write_new(tmp / f"{WEIGHTS}.safetensors", safetensors_writer(state, {"format": "pt"}))
        tmp.rename(dst)
        return dst
    raise ValueError(f"unknown ControlNet layout {to!r}; choose from {', '.join(LAYOUTS)}")


def load_controlnet(cn: ControlNetFile, dtype: torch.dtype = torch.float32) -> ControlNet:
    """The network around the file's tensors (built on the meta device, then adopting them)."""
    with skeleton():
        net = ControlNet(cn.config)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cn.state.items()}
    net.load_state_dict(state, assign=True)
    return net.eval().requires_grad_(False)
