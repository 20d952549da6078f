"""Storage dtype: weights kept in fp16 or bf16, arithmetic in float32.

Halving the weights halves a model's memory (SDXL's U-Net and text towers: 13.9 GB in float32,
6.9 GB in fp16) without computing in half precision, which CPUs without native fp16/bf16 run
slowly and which changes the numbers. Each Linear, Conv2d, GroupNorm, LayerNorm and Embedding gets
a forward closure that casts its weight and bias to the input's dtype for the call (an Embedding,
whose input is integer ids, to the compute dtype); nothing else in the model knows. The result is
exactly that of a float32 model whose weights were rounded to the storage dtype: the cast is
exact, and the float32 kernels are the same ones.

    store_weights(model, torch.float16)      # in place; returns the model
    compute_dtype(model.unet)                # float32: what inputs should be cast to

Code that casts its input "to the model's dtype" asks `compute_dtype`, not `weight.dtype`.
The temporary float32 copy of one layer's weight lives only during that layer's call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_COMPUTE = "_marble_compute_dtype"   # set on every module whose weights are stored narrower
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _forward(module: nn.Module, compute: torch.dtype):
    """The module's forward with its weights cast per call; None for a type it does not know."""
    m = module
    if isinstance(m, nn.Linear):
        return lambda x: F.linear(x, m.weight.to(x.dtype), _cast(m.bias, x.dtype))
    if isinstance(m, nn.Conv2d):
        return lambda x: m._conv_forward(x, m.weight.to(x.dtype), _cast(m.bias, x.dtype))
    if isinstance(m, nn.GroupNorm):   # GroupNorm32 too: its float32 path is plain group_norm
        return lambda x: F.group_norm(x, m.num_groups, _cast(m.weight, x.dtype), _cast(m.bias, x.dtype), m.eps)
    if isinstance(m, nn.LayerNorm):
        return lambda x: F.layer_norm(x, m.normalized_shape, _cast(m.weight, x.dtype), _cast(m.bias, x.dtype), m.eps)
    if isinstance(m, nn.Embedding):   # gather in the storage dtype, then widen only the rows used
        return lambda ids: F.embedding(ids, m.weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq,
                                       m.sparse).to(compute)
    return None


def store_weights(model: nn.Module, storage: torch.dtype, compute: torch.dtype = torch.float32) -> nn.Module:
    """Keep the weights of `model`'s Linear, Conv2d, GroupNorm, LayerNorm and Embedding modules in
    `storage` and compute in `compute` (inputs of that dtype). Parameters of other modules stay as
    they are. In place; storing in the compute dtype changes nothing."""
    if storage == compute:
        return model
    for module in model.modules():
        forward = _forward(module, compute)
        if forward is None or not any(True for _ in module.parameters(recurse=False)):
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.to(storage)
        module.forward = forward
        setattr(module, _COMPUTE, compute)
    return model


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype `module` computes in: for a container, that of its first module with weights; the
    dtype `store_weights` casts to where it was applied, else the weights' own."""
    for m in module.modules():
        params = list(m.parameters(recurse=False))
        if params:
            return getattr(m, _COMPUTE, params[0].dtype)
    raise ValueError(f"{type(module).__name__} has no weights")


def storage_dtype(name: str) -> torch.dtype:
    """"fp32" | "fp16" | "bf16" -> the torch dtype; ValueError (one line) for anything else."""
    try:
        return STORAGE_DTYPES[name]
    except KeyError:
        raise ValueError(f"weights must be one of {', '.join(STORAGE_DTYPES)}, not {name!r}") from None
