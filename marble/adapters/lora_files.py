"""LoRA files: what they hold, how to read the two formats in the wild, how marble writes one.

A LoRA layer patches a weight W (out, in[, kh, kw]) by  ΔW = (α / r) · up · down  (Hu et al. 2021,
"LoRA: Low-Rank Adaptation", eq. 3, with kohya's α/r scaling): down (r, in[, kh, kw]) and up
(out, r[, 1, 1]). For a convolution (LoCon) down is a convolution with the layer's own kernel,
stride and padding and up a 1×1 convolution, so ΔW[o, i] = Σ_r up[o, r] · down[r, i].

Formats:
- kohya / A1111: `NAME.lora_down.weight`, `NAME.lora_up.weight`, `NAME.alpha` (a scalar; absent means
  α = r);
- diffusers / PEFT: `NAME.lora_A.weight` (down), `NAME.lora_B.weight` (up); α comes from the file's
  `lora_adapter_metadata` (PEFT's LoraConfig per component: lora_alpha, alpha_pattern, use_rslora),
  else α = r. A `NAME.alpha` tensor, which some converters write, wins over the metadata.
NAME is looked up in the model's table (lora_table.py). Files are read as safetensors only (loading
never runs code); anything else, an unknown key or a shape of another architecture is a LoraError
with one line that names it, unless `lenient`, which skips and lists what it skipped.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from marble.adapters.lora_table import ModuleTable
from marble.errors import ModelLoadError
from marble.tensor_file import read_header, read_tensors, safetensors_writer
from marble.fileio import write_new

DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight")
UP_SUFFIXES = (".lora_up.weight", ".lora_B.weight")
ALPHA_SUFFIX = ".alpha"
PEFT_METADATA = "lora_adapter_metadata"


class LoraError(ModelLoadError):
    """A LoRA file or name that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class LoraLayer:
    down: torch.Tensor     # (r, in) for a Linear, (r, in, kh, kw) for a Conv2d; the file's float dtype
    up: torch.Tensor       # (out, r) for a Linear, (out, r, 1, 1) for a Conv2d
    alpha: float           # ΔW = (alpha / r) · up · down

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """ΔW in the layer's weight shape, float32, without the multiplier."""
        return delta_weight(self.down, self.up) * self.scale


@dataclass(frozen=True)
class Lora:
    name: str                          # how the user and the record call it (the file stem)
    layers: dict[str, LoraLayer]       # canonical module name (lora_table) -> layer
    hash: str = ""                     # A1111's LoRA hash (lora_hash), "" when not from a file
    metadata: dict[str, str] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()      # what a lenient read left out, one reason per entry


def delta_weight(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """up · down as a weight, float32: (out, in) for Linear, (out, in, kh, kw) for Conv2d (up is 1×1)."""
    down, up = down.float(), up.float()
    if down.ndim == 2:
        return up @ down
    return torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)


def lora_hash(path: Path) -> str:
    """A1111's LoRA hash (sd-webui-additional-networks' "addnet" hash): sha256 of the tensor bytes,
    after the safetensors header, so editing metadata keeps it; the record shows its first 12 hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _sniff(path: Path) -> str | None:
    """Why a file is not safetensors, when it is something we recognise."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "a pickle (.ckpt/.pt); LoRAs are read from .safetensors files only, since a pickle can run code"
    return None


def _shorten(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _peft_alphas(metadata: dict[str, str]) -> dict[str, dict]:
    """Component -> PEFT LoraConfig fields, from diffusers' `lora_adapter_metadata` JSON
    ({"unet.lora_alpha": 8, "text_encoder.alpha_pattern": {...}, ...})."""
    raw = metadata.get(PEFT_METADATA)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraError(f"its {PEFT_METADATA} metadata is not JSON") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        component, _, name = key.rpartition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _peft_alpha(config: dict, module: str, rank: int) -> float | None:
    """α for a module under PEFT's rules: the first alpha_pattern key that matches the end of the
    module path (peft.utils.other.get_pattern_key), else lora_alpha; rsLoRA scales by α/√r, which
    is α·√r / r in our α/r form."""
    alpha = None
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    if alpha is None and config.get("lora_alpha") is not None:
        alpha = float(config["lora_alpha"])
    if alpha is not None and config.get("use_rslora"):
        alpha *= math.sqrt(rank)
    return alpha


def _fit(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """`tensor` in the layer's shape, allowing only the 1×1-convolution <-> linear reshape; None if
    it does not fit."""
    if tuple(tensor.shape) == shape:
        return tensor
    if tensor.ndim == 4 and tensor.shape[2:] == (1, 1) and tuple(tensor.shape[:2]) == shape:
        return tensor[:, :, 0, 0]
    if tensor.ndim == 2 and len(shape) == 4 and shape[2:] == (1, 1) and tuple(tensor.shape) == shape[:2]:
        return tensor[:, :, None, None]
    return None


def _layer_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    w = module.weight.shape
    if isinstance(module, nn.Conv2d):
        return (rank, w[1], w[2], w[3]), (w[0], rank, 1, 1)
    return (rank, w[1]), (w[0], rank)


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], table: ModuleTable, *,
               name: str, lenient: bool = False) -> Lora:
    """A Lora from a file's tensors and metadata, matched against the model's table."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        for part, suffixes in (("down", DOWN_SUFFIXES), ("up", UP_SUFFIXES), ("alpha", (ALPHA_SUFFIX,))):
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix:
                groups.setdefault(key[:-len(suffix)], {})[part] = tensor
                break
        else:
            unknown.append(key)
    problems: list[str] = []   # one reason per skipped module, for the error or the lenient list
    if unknown:
        problems.append(f"keys of no LoRA format marble reads: {_shorten(sorted(unknown))}")
    peft = _peft_alphas(metadata)
    unmatched, layers = [], {}
    for module_name, parts in sorted(groups.items()):
        if "down" not in parts or "up" not in parts:
            problems.append(f"{module_name} has {'no down' if 'down' not in parts else 'no up'} weight")
            continue
        target = table.find(module_name)
        if target is None:
            unmatched.append(module_name)
            continue
        down, up = parts["down"], parts["up"]
        if not (down.is_floating_point() and up.is_floating_point()):
            problems.append(f"{module_name} holds {down.dtype} weights, not floats")
            continue
        rank = down.shape[0] if down.ndim else 0
        want_down, want_up = _layer_shapes(target.module, rank)
        down, up = _fit(down, want_down), _fit(up, want_up)
        if rank == 0 or down is None or up is None:
            problems.append(f"{module_name} has shapes {tuple(parts['down'].shape)} and {tuple(parts['up'].shape)}, "
                            f"but {target.name} {tuple(target.module.weight.shape)} needs {want_down} and {want_up} "
                            "(a LoRA for another model architecture?)")
            continue
        # NaN/inf propagate through a float32 sum: one cheap pass, no copy
        if not math.isfinite(float(down.sum(dtype=torch.float32)) + float(up.sum(dtype=torch.float32))):
            problems.append(f"{module_name} holds NaN or infinite values")
            continue
        if "alpha" in parts:
            alpha = float(parts["alpha"].float().reshape(-1)[0]) if parts["alpha"].numel() == 1 else None
            if alpha is None or not math.isfinite(alpha):
                problems.append(f"{module_name}.alpha is not one finite number")
                continue
        else:
            component, _, inner = module_name.partition(".")
            alpha = _peft_alpha(peft.get(component, {}), inner, rank) if component in peft else None
            alpha = float(rank) if alpha is None else alpha
        if target.name in layers:
            problems.append(f"{target.name} is patched twice (as {module_name} and another name)")
            continue
        layers[target.name] = LoraLayer(down.contiguous(), up.contiguous(), alpha)
    if unmatched:
        problems.append(f"layers this model does not have: {_shorten(unmatched)} "
                        "(a LoRA for another model architecture?)")
    if problems and not lenient:
        raise LoraError(f"{problems[0]}; {len(problems) - 1} more problems" if len(problems) > 1 else problems[0])
    if not layers:
        raise LoraError("it holds no LoRA layer this model has" if tensors else "it holds no tensors")
    return Lora(name, layers, metadata=dict(metadata), skipped=tuple(problems))


def read_lora(path: str | Path, table: ModuleTable, *, lenient: bool = False, name: str | None = None) -> Lora:
    """Read a kohya or PEFT LoRA file for the model `table` was built from. Nothing touches the
    model: applying is lora.py's job, so a failed read leaves the model as it was."""
    path = Path(path)
    try:
        if not path.is_file():
            raise LoraError("no such file" if not path.exists() else "not a file")
        why = _sniff(path)
        if why:
            raise LoraError(f"it is {why}")
        try:
            header = read_header(path)
            tensors = dict(read_tensors(header))
        except ModelLoadError as e:
            raise LoraError(str(e).replace(str(path), "the file")) from None
        lora = parse_lora(tensors, header.metadata, table, name=name or path.stem, lenient=lenient)
    except LoraError as e:
        raise LoraError(f"LoRA {path}: {e}") from None
    except OSError as e:
        raise LoraError(f"LoRA {path}: cannot read it ({e.strerror or e})") from None
    return Lora(lora.name, lora.layers, lora_hash(path), lora.metadata, lora.skipped)


def kohya_tensors(lora: Lora, table: ModuleTable, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The kohya-format tensors of a Lora: `lora_unet_…`/`lora_te_…` in the spelling kohya's
    sd-scripts writes (diffusers module paths), with `.alpha` for every layer."""
    out = {}
    for name, layer in lora.layers.items():
        key = table.targets[name].kohya
        out[f"{key}.lora_down.weight"] = layer.down.detach().to("cpu", dtype).contiguous()
        out[f"{key}.lora_up.weight"] = layer.up.detach().to("cpu", dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(layer.alpha, dtype=dtype)
    return out


def save_kohya(path: str | Path, lora: Lora, table: ModuleTable, metadata: dict[str, str] | None = None,
               dtype: torch.dtype = torch.float32) -> Path:
    """Write `lora` as a kohya `.safetensors` (what A1111, ComfyUI and diffusers' load_lora_weights
    read), atomically, never over an existing file. The `ss_*` metadata kohya's trainer writes that
    follows from the layers (network module, dim, alpha) is filled in; `metadata` adds the rest
    (ss_base_model_version, ss_steps, ss_learning_rate, ...)."""
    ranks = sorted({layer.rank for layer in lora.layers.values()})
    alphas = sorted({layer.alpha for layer in lora.layers.values()})
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[-1]),
            "ss_network_alpha": str(alphas[-1]), "ss_output_name": lora.name,
            **{k: str(v) for k, v in (metadata or {}).items()}}
    return write_new(Path(path), safetensors_writer(kohya_tensors(lora, table, dtype), meta))
