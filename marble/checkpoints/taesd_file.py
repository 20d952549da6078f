"""Reading a TAESD file (marble.models.taesd) that a user brings: `--preview-decoder`, `--decoder`.

Accepted: diffusers' AutoencoderTiny (`diffusion_pytorch_model.safetensors`, or its folder), and
the original repository's `taesd_decoder.safetensors` / `taesd_encoder.safetensors` (taesdxl_*
too), told apart by "decoder" / "encoder" in the file name. safetensors only: no pickles. Anything
else is refused with one line (ModelLoadError) saying what was wrong.
"""
from __future__ import annotations

from pathlib import Path

import torch

from marble.errors import ModelLoadError
from marble.models.taesd import TinyAutoencoder, config_from_shapes, taesd_keys
from marble.tensor_file import read_header, read_tensors


def _file(path: Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / "diffusion_pytorch_model.safetensors", path / "vae" / "diffusion_pytorch_model.safetensors"):
            if candidate.is_file():
                return candidate
        raise ModelLoadError(f"{path} is a folder without diffusion_pytorch_model.safetensors (a diffusers "
                             "AutoencoderTiny folder has one)")
    if not path.is_file():
        raise ModelLoadError(f"no TAESD file at {path}")
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path}: TAESD is read from .safetensors files only (no pickles)")
    return path


def read_taesd(path: Path | str, *, need: str = "decoder") -> TinyAutoencoder:
    """A TAESD in float32, eval mode. `need`: "decoder" or "encoder", the half the caller uses."""
    path = _file(Path(path))
    header = read_header(path)
    stem = path.stem.lower()
    part = "decoder" if "decoder" in stem else "encoder" if "encoder" in stem else None
    names = taesd_keys(header.entries, part)
    shapes = {names[k]: header.entries[k].shape for k in names}
    if not any(k.startswith(f"{need}.layers.") for k in shapes):
        what = "no TAESD weights" if not shapes else f"no TAESD {need}"
        raise ModelLoadError(f"{path} holds {what} (expected diffusers AutoencoderTiny keys "
                             f"{need}.layers.N.*, or a taesd_{need} file)")
    try:
        config = config_from_shapes(shapes)
    except (KeyError, ValueError):
        raise ModelLoadError(f"{path} is not a TAESD file (its first layers are missing)") from None
    module = TinyAutoencoder(config, encoder=any(k.startswith("encoder.") for k in shapes),
                             decoder=any(k.startswith("decoder.") for k in shapes))
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        raise ModelLoadError(f"{path} does not match TAESD's layout ({len(missing)} missing keys, e.g. "
                             f"{(missing or ['-'])[0]}; {len(extra)} unexpected, e.g. {(extra or ['-'])[0]})")
    wrong = [k for k in expected if shapes[k] != expected[k]]
    if wrong:
        raise ModelLoadError(f"{path}: {wrong[0]} has shape {list(shapes[wrong[0]])}, TAESD's is "
                             f"{list(expected[wrong[0]])}")
    state = {names[k]: t for k, t in read_tensors(header, names, torch.float32)}
    module.load_state_dict(state)
    return module.eval().requires_grad_(False)
