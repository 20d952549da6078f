"""The LoRA folder: where `<lora:NAME:…>` names are looked up, and what `GET /sdapi/v1/loras` lists.

The folder is `--lora-dir`, else $MARBLE_LORA_DIR, else `models/lora` beside the named models
(marble.checkpoints.resolve.models_dir). A NAME is a file stem, optionally in a subfolder
(`styles/ink`), and it only ever resolves inside the folder: absolute names, `..` and symlinks that
lead out of it are refused, so a prompt (which a server takes from anyone) cannot open other files.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from marble.adapters.lora_files import LoraError
from marble.checkpoints.resolve import models_dir
from marble.tensor_file import read_header

SUFFIX = ".safetensors"


def default_lora_dir() -> Path:
    env = os.environ.get("MARBLE_LORA_DIR")
    return Path(env) if env else models_dir() / "lora"


def resolve_lora(name: str, folder: Path | None = None) -> Path:
    """The file `name` means inside `folder`; LoraError (one line) when it is not there or not allowed."""
    folder = Path(folder) if folder is not None else default_lora_dir()
    if not name or "\x00" in name:
        raise LoraError("empty LoRA name")
    relative = Path(name)
    if relative.is_absolute() or name.startswith(("/", "\\")) or ".." in relative.parts or "\\" in name:
        raise LoraError(f"LoRA name {name!r} must be a name inside the LoRA folder, not a path out of it")
    root = folder.resolve()
    candidate = folder / (name if name.endswith(SUFFIX) else name + SUFFIX)
    if not candidate.is_file():
        raise LoraError(f"no LoRA named {name!r} in {folder}")
    real = candidate.resolve()
    if not real.is_relative_to(root):
        raise LoraError(f"LoRA {name!r} is a link out of the LoRA folder; refused")
    return real


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]` (the CLI's --lora) -> (path, weight); the weight defaults to 1."""
    path, colon, weight = text.rpartition(":")
    if not colon or not path:
        return text, 1.0
    try:
        value = float(weight)
    except ValueError:
        if "/" in weight or "\\" in weight or "." in weight:   # a colon inside the path, no weight
            return text, 1.0
        raise LoraError(f"--lora {text}: weight {weight!r} is not a number") from None
    if not math.isfinite(value):
        raise LoraError(f"--lora {text}: weight {weight!r} is not a finite number")
    return path, value


def list_loras(folder: Path | None = None) -> list[dict]:
    """The folder's LoRAs as A1111's GET /sdapi/v1/loras lists them: name (what a tag uses), alias
    (the trainer's ss_output_name, else the name), path and the file's metadata. Files that are
    not readable safetensors, and links out of the folder, are left out."""
    folder = Path(folder) if folder is not None else default_lora_dir()
    if not folder.is_dir():
        return []
    root = folder.resolve()
    out = []
    for path in sorted(folder.rglob(f"*{SUFFIX}")):
        real = path.resolve()
        if not real.is_relative_to(root) or not real.is_file():
            continue
        try:
            metadata = read_header(real).metadata
        except Exception:   # a broken file is listed nowhere, and fails by name when used
            continue
        name = path.relative_to(folder).with_suffix("").as_posix()
        out.append({"name": name, "alias": metadata.get("ss_output_name") or name, "path": str(real),
                    "metadata": metadata})
    return out
