"""Training checkpoints: everything needed to continue exactly, written atomically.

A checkpoint holds plain tensors, numbers and strings only, saved with torch.save and read back
with `torch.load(weights_only=True)`, which refuses anything that would execute code.
"""
from __future__ import annotations

from pathlib import Path

import torch

from marble.fileio import write_replace


def save_checkpoint(state: dict, path: Path) -> None:
    """A crash at any point leaves the previous checkpoint intact."""
    write_replace(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict:
    return torch.load(Path(path), map_location="cpu", weights_only=True)
