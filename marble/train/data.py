"""Training data: captioned images in memory, the batch order, and the latent / text caches.

The batch at step k is a pure function of (seed, k): an epoch-wise permutation of the data set.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from marble.fileio import write_replace
from marble.tensor_file import read_header, read_tensors, safetensors_writer
from marble.train.config import ConfigError, DataConfig


@dataclass
class Captioned:
    images: torch.Tensor      # (N, 3, H, W) uint8
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def pixels_from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Global batch `step`: consecutive slices of a per-epoch permutation (seeded by seed, epoch)."""
    per_epoch = max(1, n // batch)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[pos * batch:(pos + 1) * batch].tolist()


def load_captioned(data: DataConfig) -> Captioned:
    if data.folder:
        if data.kinds is not None:
            raise ConfigError("data.kinds weighs the shapes world's scene kinds; an image folder has none")
        from marble.data.image_folder import ImageFolder
        try:
            folder = ImageFolder(data.folder)
        except (OSError, ValueError) as e:
            raise ConfigError(str(e)) from None
        images, captions = [], []
        for i in range(len(folder)):
            image, caption, _ = folder[i]
            image = image.convert("RGB")
            if image.size != (data.size, data.size):
                image = _center_crop_resize(image, data.size)
            images.append(np.asarray(image))
            captions.append(caption)
        return Captioned(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions)
    if data.world == "shapes":
        from marble.data.shapes import kind_probabilities, render_dataset
        try:
            kinds = kind_probabilities(data.kinds)
        except ValueError as e:
            raise ConfigError(f"data.kinds: {e}") from None
        images, captions = render_dataset(n=data.n, split=data.split, seed=data.seed, size=data.size, kinds=kinds)
        return Captioned(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions)
    raise ConfigError("data needs `folder = PATH` or `world = \"shapes\"`")


def _center_crop_resize(image, size: int):
    from PIL import Image
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return image.resize((size, size), Image.LANCZOS)


def _cached(path: Path, key: str, compute, about: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Load tensors cached under `path` if made for the same `key`, else compute and store them
    (with `about`, e.g. a description of the tensors, beside the key in the file's metadata)."""
    if path.exists():
        try:
            header = read_header(path)
            if header.metadata.get("key") == key:
                return dict(read_tensors(header))
        except Exception:
            pass  # a stale or damaged cache is recomputed
    tensors = compute()
    write_replace(path, safetensors_writer(tensors, {**(about or {}), "key": key}))
    return tensors


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.inference_mode()
def latent_cache(path: Path, key: str, vae, data: Captioned, batch: int = 64) -> torch.Tensor:
    """VAE latents (posterior mean, scaled) of every image, computed once per (data, VAE)."""
    def compute():
        out = [vae.encode(pixels_from_uint8(data.images[i:i + batch])) for i in range(0, len(data), batch)]
        return {"latents": torch.cat(out).to(torch.float16)}
    return _cached(path, key, compute)["latents"].float()


@torch.inference_mode()
def text_cache(path: Path, key: str, encoder, captions: list[str], batch: int = 128) -> tuple[torch.Tensor, list[int]]:
    """Frozen text-encoder states for each distinct caption (and "" for caption dropout, at index 0).
    Returns (states (U, T, D), index of each caption's row)."""
    unique = [""] + sorted(set(captions) - {""})
    row = {c: i for i, c in enumerate(unique)}

    def compute():
        out = [encoder.encode(unique[i:i + batch]) for i in range(0, len(unique), batch)]
        return {"states": torch.cat(out).to(torch.float16)}
    states = _cached(path, key, compute)["states"].float()
    return states, [row[c] for c in captions]
