"""--threads and --dtype: the compute settings generate, serve and eval share, read in one place."""
from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from marble.cli.app import fail, warn

if TYPE_CHECKING:
    import torch

THREADS_HELP = ("torch CPU threads; 0 = one per core. On a machine where other processes compete for "
                "the cores, 1 can be faster (docs/bench.md, \"Threads\").")
DTYPE_HELP = ("Compute dtype: auto (bf16 where the CPU has AVX512-BF16 or AMX, else fp32), fp32, bf16 or fp16. "
              "The PNG record states the one used. Also $MARBLE_DTYPE.")


TRACE_HELP = ("Run the U-Net as a TorchScript trace: the same bits with less Python per call (the built-in model's "
              "image about 17% faster warm, docs/bench.md), 1-3 s of tracing per image size and batch first.")


def trace_option():
    return typer.Option(False, "--trace", help=TRACE_HELP)


def threads_option(default: int = 0):
    return typer.Option(default, "--threads", help=THREADS_HELP)


def dtype_option():
    return typer.Option("auto", "--dtype", envvar="MARBLE_DTYPE", help=DTYPE_HELP)


def apply_threads(threads: int) -> None:
    """Validate --threads and set torch's thread count (0 leaves torch's default)."""
    if threads < 0:
        fail(f"--threads must be >= 0, got {threads}")
    from marble.threads import set_threads
    set_threads(threads)


def read_dtype(name: str) -> "torch.dtype":
    """--dtype as a torch dtype: exit 2 for an unknown name, one warning where it will be slow."""
    from marble.cpu_features import dtype_warning, resolve_dtype
    try:
        resolved = resolve_dtype(name)
    except ValueError as e:
        fail(str(e))
    message = dtype_warning(resolved)
    if message:
        warn(message)
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[resolved]
