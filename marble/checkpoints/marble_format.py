"""marble's model file: one safetensors file, its typed config as JSON in the metadata.

Keys are the state dict of `LatentDiffusion`: `unet.*`, `vae.*`, and `text_encoder.*` unless the
text encoder is a pretrained one that ships in a package (then its config names it). A trained VAE
alone (the first stage of a recipe) is stored the same way under its own format tag. Both are read
and written through tensor_file (streamed, one tensor at a time); loading executes no code:
safetensors holds only tensors and strings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from marble.checkpoints.checkpoint import (Checkpoint, SafetensorsSource, config_from_metadata, convert_state,
                                           expected_state, file_hash, refuse_existing)
from marble.config import config_to_json
from marble.errors import ModelLoadError
from marble.fileio import write_new
from marble.models.latent_diffusion import LatentDiffusionConfig
from marble.models.skeleton import skeleton
from marble.models.vae import AutoencoderKL, VAEConfig
from marble.tensor_file import read_header, safetensors_writer

FORMAT = "marble"
VAE_FORMAT = "marble-vae"
FORMAT_VERSION = "1"


def _write(path: Path, fmt: str, config, state: dict[str, torch.Tensor]) -> Path:
    path = refuse_existing(path)
    metadata = {"format": fmt, "format_version": FORMAT_VERSION, "config": config_to_json(config)}
    return write_new(path, safetensors_writer(state, metadata))


def _read(path: Path, fmt: str, cls: type, what: str, expected: Callable[[object], dict[str, torch.Tensor]],
          dtype: torch.dtype | None, mapped: bool = False):
    """(config, state) of a file in one of marble's formats, keys checked against `expected(config)`."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no {what} file at {path}")
    header = read_header(path)
    if header.metadata.get("format") != fmt:
        raise ModelLoadError(f"{path} is a safetensors file but not a {what} (no {what} config in its metadata)")
    config = config_from_metadata(path, header.metadata.get("config"), cls, what)
    state = convert_state(SafetensorsSource([header], path, mapped), lambda k, t: [(k, t)], expected(config), dtype)
    return config, state


def read_marble(path: Path, dtype: torch.dtype | None = None, mapped: bool = False) -> Checkpoint:
    """A marble model file. `dtype` casts floating tensors while reading (None: as stored);
    `mapped`: memory-map what needs no cast (checkpoint.SafetensorsSource)."""
    config, state = _read(path, FORMAT, LatentDiffusionConfig, "marble model", expected_state, dtype, mapped)
    return Checkpoint(config, state, Path(path), file_hash(path), "marble")


def write_marble(ckpt: Checkpoint, path: Path) -> Path:
    """A marble model file, written atomically and never over a file."""
    return _write(path, FORMAT, ckpt.config, ckpt.state)


# --- a single trained VAE (the first stage of a latent-diffusion recipe) ---------------------------

def _vae_skeleton(config: VAEConfig) -> AutoencoderKL:
    with skeleton():
        return AutoencoderKL(config)


def write_vae(vae: AutoencoderKL, path: Path) -> Path:
    """A VAE alone: its VAEConfig in the metadata; atomic, never overwriting."""
    return _write(path, VAE_FORMAT, vae.config, vae.state_dict())


def read_vae(path: Path) -> AutoencoderKL:
    """A VAE file, in float32."""
    config, state = _read(path, VAE_FORMAT, VAEConfig, "marble VAE", lambda c: _vae_skeleton(c).state_dict(),
                          torch.float32)
    vae = _vae_skeleton(config)
    vae.load_state_dict(state, assign=True)
    return vae
