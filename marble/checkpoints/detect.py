"""Which kind of model a path holds, and reading it into a Checkpoint.

  folder with model_index.json          -> diffusers pipeline folder
  .ckpt / .pt / .pth / .bin             -> pickle: only with allow_pickle, via torch.load(weights_only=True)
  safetensors with marble metadata      -> marble model file
  safetensors with model.diffusion_model.* keys -> SD single file (SD1.x, SD2.x, SDXL)
Anything else is refused with one line saying what was found; SD3 and Flux files by name.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from marble.checkpoints.checkpoint import PICKLE_SUFFIXES, Checkpoint, PickleSource, pickle_refused
from marble.checkpoints.controlnet_files import is_controlnet
from marble.checkpoints.diffusers_folder import is_diffusers_folder, read_diffusers
from marble.checkpoints.marble_format import FORMAT, read_marble
from marble.diffusion.few_step import PRESETS
from marble.checkpoints.sd_single_file import is_sd_single_file, read_single_file, refuse_unsupported
from marble.errors import ModelLoadError
from marble.tensor_file import read_header

KINDS = ("marble", "diffusers", "single-file")


def detect_kind(path: Path, allow_pickle: bool = False) -> str:
    """"marble" | "diffusers" | "single-file" (pickles count as single files)."""
    path = Path(path)
    if is_controlnet(path):
        raise ModelLoadError(f"{path} is a ControlNet, not a model: give it with --control-model "
                             "(and convert it with marble convert)")
    if path.is_dir():
        if is_diffusers_folder(path):
            return "diffusers"
        raise ModelLoadError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
    if not path.is_file():
        raise ModelLoadError(f"no model file at {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise pickle_refused(path)
        return "single-file"
    header = read_header(path)
    if header.metadata.get("format") == FORMAT:
        return "marble"
    refuse_unsupported(header.entries, path)
    if is_sd_single_file(header.entries):
        return "single-file"
    raise ModelLoadError(f"{path} is a safetensors file but neither a marble model nor a Stable Diffusion "
                         "checkpoint (no marble config, no model.diffusion_model.* keys)")


def open_checkpoint(path: Path | str, *, dtype: torch.dtype | None = None, allow_pickle: bool = False,
                    prediction: str | None = None, mapped: bool = False) -> Checkpoint:
    """Read any supported model into marble keys. `dtype` casts floating tensors while reading
    (None keeps them as stored, for lossless conversion); `prediction` ("eps" | "v" | "x0")
    overrides what the files say or imply; `mapped`: safetensors tensors already in `dtype` are
    views of a read-only memory map of the file (`--low-memory`), the rest copies."""
    path = Path(path).expanduser()
    kind = detect_kind(path, allow_pickle)
    if kind == "diffusers":
        ckpt = read_diffusers(path, dtype, allow_pickle, mapped)
    elif kind == "marble":
        ckpt = read_marble(path, dtype, mapped)
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        source = PickleSource(path)
        refuse_unsupported(source.tensors, path)
        if not any(k.startswith("model.diffusion_model.") for k in source.tensors):
            raise ModelLoadError(f"{path} holds no Stable Diffusion weights (no model.diffusion_model.* keys)")
        ckpt = read_single_file(path, dtype, allow_pickle=True, prediction=prediction, source=source)
    else:
        ckpt = read_single_file(path, dtype, prediction=prediction, mapped=mapped)
    return with_few_step(ckpt.with_prediction(prediction))


# Stability's file and repository names: sd_turbo.safetensors, sd_xl_turbo_1.0_fp16.safetensors,
# stabilityai/sd-turbo, stabilityai/sdxl-turbo. Their files carry no marker of being distilled.
_TURBO = re.compile(r"(?:^|[^a-z0-9])(?:sd|sdxl|sd[-_]xl)[-_ ]?turbo", re.IGNORECASE)


def with_few_step(ckpt: Checkpoint) -> Checkpoint:
    """An SD/SDXL-Turbo checkpoint (known by its name) gets the SD-Turbo card's settings; a marble
    file carries its own in its config."""
    if ckpt.kind == "marble" or ckpt.config.few_step is not None or not _TURBO.search(ckpt.name):
        return ckpt
    return replace(ckpt, config=ckpt.config.replace(few_step=PRESETS["sd-turbo"]))
