"""Dynamic int8 quantisation of a network's Linear layers (PyTorch's eager-mode dynamic
quantisation, `torch.ao.quantization.quantize_dynamic`; Jacob et al. 2018 for the int8 scheme).

Weights are stored as int8 with one scale per tensor (PyTorch's default dynamic qconfig); activations are quantised per call from their observed range, the matrix multiply runs in
int8 (fbgemm/x86 kernels) and the result returns in float32. Convolutions stay float32: dynamic
quantisation has no convolution kernel. An approximation, off by default; the U-Net's transformers
only (the text encoder runs once per image, so it would cost accuracy for no time). Its measured cost is in
docs/bench.md.

torchao is the successor (0.18.0 resolves beside torch 2.13.0+cpu), but torch's own
implementation ships with torch and needs no new dependency.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from marble.models.layers import SpatialTransformer

QUANTIZATIONS = ("int8",)


def check_quantization(name: str | None) -> str | None:
    """None or a known name (lower-cased); ValueError naming the choices."""
    if name is None:
        return None
    key = name.strip().lower() if isinstance(name, str) else name
    if key in ("", "none", "off"):
        return None
    if key not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {name!r}; choose from: {', '.join(QUANTIZATIONS)}")
    return key


def quantize_linear(network: nn.Module, name: str = "int8") -> nn.Module:
    """Replace the nn.Linear layers of `network`'s spatial transformers (in place) with their
    dynamically quantised int8 form: they hold nearly all of a U-Net's Linear work (projections,
    feed-forward), while the time-embedding layers run once per call on one row and set the dtype
    the network computes in (weight_cast.compute_dtype), so they stay float32. float32 networks
    only: the int8 kernels read and write float32 activations."""
    if check_quantization(name) != "int8":
        raise ValueError(f"unknown quantization {name!r}")
    dtypes = {p.dtype for p in network.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"int8 quantization needs a float32 network, this one is {sorted(map(str, dtypes))}")
    with warnings.catch_warnings():   # torch.ao.quantization announces its move to torchao on every call
        warnings.simplefilter("ignore")
        for module in network.modules():
            if isinstance(module, SpatialTransformer):
                torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return network


def is_quantized(network: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    return any(isinstance(m, DynamicLinear) for m in network.modules())
