"""`marble convert MODEL OUT --lora PATH:WEIGHT …`: a new checkpoint with LoRAs fused into its weights."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from marble.adapters.lora import LoraUse, fuse
from marble.adapters.lora_files import read_lora
from marble.adapters.lora_table import module_table
from marble.checkpoints.checkpoint import Checkpoint, from_model, refuse_existing, text_is_external, to_model
from marble.checkpoints.convert import write_checkpoint
from marble.checkpoints.detect import open_checkpoint
from marble.errors import LoraError


def merge_loras(src: Path | str, dst: Path | str, to: str, loras: Sequence[tuple[str, float]], *,
                lenient: bool = False, allow_pickle: bool = False, prediction: str | None = None,
                dtype: torch.dtype | None = None) -> tuple[Checkpoint, list[LoraUse]]:
    """Read `src`, fuse each (LoRA path, weight) into it (W += weight·(α/r)·up·down, in float32),
    write `dst` as `to` in the stored dtype (or `dtype`). Every LoRA is read and checked before
    anything is fused, and `dst` is written atomically, so a bad LoRA leaves no file."""
    dst = refuse_existing(Path(dst))
    ckpt = open_checkpoint(src, dtype=dtype, allow_pickle=allow_pickle, prediction=prediction)
    stored = dtype or next(v.dtype for k, v in ckpt.state.items() if k.startswith("unet.") and v.is_floating_point())
    model = to_model(ckpt, torch.float32)
    table = module_table(model)
    uses = [LoraUse(read_lora(path, table, lenient=lenient), weight, weight) for path, weight in loras]
    if text_is_external(model.config):
        for use in uses:
            if use.te and any(table.targets[name].component != "unet" for name in use.lora.layers):
                raise LoraError(f"LoRA {use.lora.name} patches the text encoder, which this model takes from an "
                                "installed package and does not store; it cannot be merged into the file")
    fuse(model, uses, table)
    merged = from_model(model, ckpt.source, dtype=stored)
    write_checkpoint(merged, dst, to)
    return merged, uses
