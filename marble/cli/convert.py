"""`marble convert SRC DST --to {marble|diffusers|single-file}`."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from marble.cli.app import app, fail, info, warn


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
            "single file (.safetensors; .ckpt/.pt with --allow-pickle). Also a ControlNet: lllyasviel's file "
            "(single-file), a diffusers ControlNetModel folder or file, or marble's.")


@app.command()
def convert(
    src: Path = typer.Argument(..., help=SRC_HELP),
    dst: Path = typer.Argument(..., help="Where to write: a file (marble, single-file) or a new folder (diffusers). Never overwritten."),
    to: Target = typer.Option(..., "--to", help="Target layout."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read .ckpt/.pt/.bin pickles (tensors only, torch.load weights_only=True)."),
    prediction: Optional[Prediction] = typer.Option(None, "--prediction", help="Override what the model predicts (eps | v | x0)."),
    dtype: Optional[DType] = typer.Option(None, "--dtype", help="Cast floating tensors (default: keep them as stored, bit for bit)."),
    lora: Optional[list[str]] = typer.Option(None, "--lora", help="Fuse a LoRA file into the weights: PATH[:WEIGHT] (weight 1 by default). Repeatable."),
    lora_lenient: bool = typer.Option(False, "--lora-lenient", help="Skip (with a warning) the layers of a LoRA this model lacks, instead of refusing it."),
) -> None:
    """Convert a model between marble's file, a diffusers folder and an SD single file.

    Tensors are copied bit for bit unless --dtype asks for a cast, or --lora fuses LoRAs into the
    weights (W + weight·(α/r)·up·down, computed in float32, stored in the model's dtype). Prints the
    path written.
    """
    import torch

    from marble.checkpoints.convert import convert as run_convert
    from marble.errors import ModelLoadError

    if dst.exists():
        fail(f"{dst} exists; marble never overwrites a model")
    if not src.exists():
        fail(f"no model at {src}")
    options = dict(allow_pickle=allow_pickle, prediction=prediction.value if prediction else None,
                   dtype=getattr(torch, DTYPES[dtype.value]) if dtype else None)
    try:
        if lora:
            from marble.adapters.lora_folder import parse_lora_arg
            from marble.adapters.lora_merge import merge_loras
            ckpt, uses = merge_loras(src, dst, to.value, [parse_lora_arg(v) for v in lora], lenient=lora_lenient,
                                     **options)
            for use in uses:
                for why in use.lora.skipped:
                    warn(f"LoRA {use.lora.name}: skipped {why}")
                info(f"fused LoRA {use.lora.name} [{use.lora.hash}] × {use.unet:g}: {len(use.lora.layers)} layers")
        else:
            ckpt = run_convert(src, dst, to.value, **options)
    except (ModelLoadError, FileExistsError, ValueError) as e:
        fail(str(e))
    size = sum(t.numel() * t.element_size() for t in ckpt.state.values())
    if not hasattr(ckpt.config, "prediction"):   # a ControlNet
        info(f"converted {ckpt.kind} ControlNet {src} -> {to.value}: {len(ckpt.state)} tensors, {size / 2**20:.1f} MiB, "
             f"{ckpt.config.unet.model_channels}-wide encoder, hint factor {ckpt.config.hint_factor}")
        typer.echo(str(dst))
        return
    info(f"converted {ckpt.kind} {src} -> {to.value}: {len(ckpt.state)} tensors, {size / 2**20:.1f} MiB, "
         f"{ckpt.config.unet.in_channels}-channel {getattr(ckpt.config.unet, 'kind', 'U-Net')}, "
         f"prediction {ckpt.config.prediction}")
    typer.echo(str(dst))
