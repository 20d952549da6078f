"""`marble convert`: read any supported model, write it in another layout, tensors untouched.

Tensors keep their stored dtype unless a dtype is asked for, so every conversion is lossless:
marble ↔ diffusers ↔ single file round-trips bit for bit (the keys an SD file carries that no
model uses, such as ldm's schedule buffers, EMA copies and OpenCLIP's unused last layer, are
not carried over).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from marble.checkpoints.checkpoint import Checkpoint, refuse_existing
from marble.checkpoints.controlnet_files import ControlNetFile, holds_controlnet, read_controlnet, write_controlnet
from marble.checkpoints.detect import open_checkpoint
from marble.checkpoints.diffusers_folder import write_diffusers
from marble.checkpoints.marble_format import write_marble
from marble.checkpoints.sd_single_file import write_single_file

WRITERS: dict[str, Callable[[Checkpoint, Path], Path]] = {
    "marble": write_marble,
    "diffusers": write_diffusers,
    "single-file": write_single_file,
}


def write_checkpoint(ckpt: Checkpoint, dst: Path, to: str) -> Path:
    if to not in WRITERS:
        raise ValueError(f"unknown target format {to!r}; choose from {', '.join(WRITERS)}")
    return WRITERS[to](ckpt, Path(dst))


def convert(src: Path | str, dst: Path | str, to: str, *, allow_pickle: bool = False,
            prediction: str | None = None, dtype: torch.dtype | None = None) -> Checkpoint | ControlNetFile:
    """Read `src` (any supported kind), write `dst` as `to`; returns what was read. `dtype` casts the
    floating tensors (None: as stored). Nothing is written when reading fails; `dst` is written
    atomically and never replaced. A ControlNet converts between marble's file, a diffusers
    ControlNetModel folder and lllyasviel's single file ("single-file")."""
    dst = refuse_existing(dst)
    if holds_controlnet(Path(src).expanduser(), allow_pickle):
        if to not in WRITERS:
            raise ValueError(f"unknown target format {to!r}; choose from {', '.join(WRITERS)}")
        cn = read_controlnet(src, dtype=dtype, allow_pickle=allow_pickle)
        write_controlnet(cn, dst, to)
        return cn
    ckpt = open_checkpoint(src, dtype=dtype, allow_pickle=allow_pickle, prediction=prediction)
    write_checkpoint(ckpt, dst, to)
    return ckpt
