"""marble's model file: one safetensors file, its typed config as JSON in the metadata.

Keys are the state dict of `LatentDiffusion`: `unet.*`, `vae.*`, and `text_encoder.*` unless the
text encoder is a pretrained one that ships in a package (then its config names it). Loading
executes no code: safetensors holds only tensors and strings.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from marble.checkpoints.errors import ModelLoadError
from marble.checkpoints.tensor_file import read_header
from marble.fileio import write_new
from marble.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from marble.models.skeleton import skeleton
from marble.models.text import build_text_encoder, text_encoder_is_pretrained

FORMAT = "marble"
FORMAT_VERSION = "1"


def text_is_external(config: LatentDiffusionConfig) -> bool:
    """Pretrained text encoders are loaded from their package, not stored in the model file."""
    return text_encoder_is_pretrained(config.text)


def model_state(model: LatentDiffusion) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if text_is_external(model.config):
        state = {k: v for k, v in state.items() if not k.startswith("text_encoder.")}
    return state


def save_model(model: LatentDiffusion, path: Path, dtype: torch.dtype | None = None,
               extra_metadata: dict[str, str] | None = None) -> Path:
    """Write atomically; refuse to overwrite. `dtype` casts floating tensors (e.g. fp16 to ship)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; marble never overwrites a model file")
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in model_state(model).items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_json(),
                **(extra_metadata or {})}
    return write_new(path, save(state, metadata=metadata))


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's metadata, read (and the header checked) without loading tensors."""
    return read_header(Path(path)).metadata


def load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path} is truncated or corrupt: {str(e).splitlines()[0]}") from None


def check_keys(path: Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:5])}{', …' if len(unexpected) > 5 else ''})")
        raise ModelLoadError(f"{path} does not match its config: {'; '.join(parts)}")
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(found[k].shape)]
    if bad:
        k = bad[0]
        raise ModelLoadError(f"{path}: {len(bad)} tensors have the wrong shape, e.g. {k} is "
                             f"{tuple(found[k].shape)}, expected {tuple(expected[k].shape)}")


def build_model(config: LatentDiffusionConfig, state: dict[str, torch.Tensor], source: Path,
                dtype: torch.dtype = torch.float32) -> LatentDiffusion:
    """Build the networks without allocating weights (meta device), then adopt the loaded tensors:
    peak memory stays near the size of the weights."""
    external = text_is_external(config)
    text = build_text_encoder(config.text) if external else None
    with skeleton():
        model = LatentDiffusion(config, text_encoder=text)
    expected = {k: v for k, v in model.state_dict().items() if not (external and k.startswith("text_encoder."))}
    check_keys(source, expected, state)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, strict=not external, assign=True)
    return model.eval().requires_grad_(False)


def load_model_file(path: Path, dtype: torch.dtype = torch.float32) -> LatentDiffusion:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no model file at {path}")
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{path} is a safetensors file but not a marble model (no marble config in its metadata)")
    try:
        config = LatentDiffusionConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: the model config in the metadata is invalid ({e})") from None
    model = build_model(config, load_state(path), path, dtype)
    model.source = str(path)
    return model


def file_hash(path: Path) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


def state_hash(model: LatentDiffusion) -> str:
    """For models that have no file (e.g. seeded random ones): sha256 over the serialized weights."""
    return hashlib.sha256(save({k: v.contiguous() for k, v in model_state(model).items()})).hexdigest()[:10]


# --- a single trained VAE (the first stage of a latent-diffusion recipe) ---------------------------

def save_vae(vae, path: Path) -> Path:
    """A VAE alone: safetensors with its VAEConfig in the metadata; atomic, never overwriting."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; marble never overwrites a model file")
    data = save({k: v.contiguous() for k, v in vae.state_dict().items()},
                metadata={"format": "marble-vae", "format_version": FORMAT_VERSION,
                          "config": json.dumps(vae.config.to_dict(), sort_keys=True)})
    return write_new(path, data)


def load_vae(path: Path):
    from marble.models.vae import AutoencoderKL, VAEConfig

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no VAE file at {path}")
    meta = read_metadata(path)
    if meta.get("format") != "marble-vae":
        raise ModelLoadError(f"{path} is not a marble VAE file")
    try:
        config = VAEConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: the VAE config in the metadata is invalid ({e})") from None
    with skeleton():
        vae = AutoencoderKL(config)
    state = load_state(path)
    check_keys(path, vae.state_dict(), state)
    vae.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return vae
