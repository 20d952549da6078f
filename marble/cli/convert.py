"""`marble convert SRC DST --to {marble|diffusers|single-file}`."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from marble.cli.app import app, fail, info


class Target(str, Enum):
    marble = "marble"
    diffusers = "diffusers"
    single_file = "single-file"


class Prediction(str, Enum):
    eps = "eps"
    v = "v"
    x0 = "x0"


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

SRC_HELP = ("A marble .safetensors file, a diffusers pipeline folder (model_index.json), or an SD "
            "single file (.safetensors; .ckpt/.pt with --allow-pickle).")


@app.command()
def convert(
    src: Path = typer.Argument(..., help=SRC_HELP),
    dst: Path = typer.Argument(..., help="Where to write: a file (marble, single-file) or a new folder (diffusers). Never overwritten."),
    to: Target = typer.Option(..., "--to", help="Target layout."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read .ckpt/.pt/.bin pickles (tensors only, torch.load weights_only=True)."),
    prediction: Optional[Prediction] = typer.Option(None, "--prediction", help="Override what the model predicts (eps | v | x0)."),
    dtype: Optional[DType] = typer.Option(None, "--dtype", help="Cast floating tensors (default: keep them as stored, bit for bit)."),
) -> None:
    """Convert a model between marble's file, a diffusers folder and an SD single file.

    Tensors are copied bit for bit unless --dtype asks for a cast. Prints the path written.
    """
    import torch

    from marble.checkpoints.convert import convert as run_convert
    from marble.errors import ModelLoadError

    if dst.exists():
        fail(f"{dst} exists; marble never overwrites a model")
    if not src.exists():
        fail(f"no model at {src}")
    try:
        ckpt = run_convert(src, dst, to.value, allow_pickle=allow_pickle,
                           prediction=prediction.value if prediction else None,
                           dtype=getattr(torch, DTYPES[dtype.value]) if dtype else None)
    except (ModelLoadError, FileExistsError, ValueError) as e:
        fail(str(e))
    size = sum(t.numel() * t.element_size() for t in ckpt.state.values())
    info(f"converted {ckpt.kind} {src} -> {to.value}: {len(ckpt.state)} tensors, {size / 2**20:.1f} MiB, "
         f"{ckpt.config.unet.in_channels}-channel U-Net, prediction {ckpt.config.prediction}")
    typer.echo(str(dst))
