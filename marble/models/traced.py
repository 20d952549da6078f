"""A network run as a TorchScript trace: the same kernels in the same order, without Python.

The built-in model's U-Net works on 16×16 latents and smaller, where each of its ~600 operators
is short and Python's module calls take about a quarter of a U-Net call (docs/bench.md, "Where
the built-in model's time goes"). `torch.jit.trace` records the operators once per input shape
and replays them: the output is bit-identical (tests/test_traced.py), and tracing costs about a
second per shape, paid by the first call with that shape. Worth it for a warm process (serve,
eval), not for one `marble generate`.

A trace only sees weights and code as they were when it was recorded, so calls fall back to the
eager network whenever that could differ: extra conditioning (ControlNet residuals, inpainting
channels, SDXL's y), forward hooks (unfused LoRAs) or swapped parameters (materialised LoRAs).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules import module as _module


class TracedNetwork:
    """network(x, t, context) through a trace per (shape, dtype) signature; anything else eagerly."""

    def __init__(self, network: nn.Module):
        self.network = network
        self._modules = list(network.modules())
        # each module's parameter slots, read per call: 15x cheaper than walking network.parameters()
        # (26 against 388 µs for the built-in U-Net, a few percent of a batch-1 call)
        self._slots = [(m._parameters, name) for m in self._modules for name in m._parameters]
        self._traces: dict[tuple, tuple[torch.jit.ScriptModule, tuple[int, ...]]] = {}

    def _weights(self) -> tuple[int, ...]:
        return tuple(id(params.get(name)) for params, name in self._slots)   # a removed one reads as None

    def _hooked(self) -> bool:
        return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks) or any(
            m._forward_hooks or m._forward_pre_hooks for m in self._modules)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None, **extra):
        if extra or context is None or torch.is_grad_enabled() or self._hooked():
            return self.network(x, t, context, **extra)
        key = tuple((tuple(v.shape), v.dtype, v.device) for v in (x, t, context))
        weights = self._weights()
        entry = self._traces.get(key)
        if entry is None or entry[1] != weights:
            with warnings.catch_warnings():   # the tracer warns about Python values it records as constants
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(self.network, (x, t, context), check_trace=False)
            entry = self._traces[key] = (traced, weights)
        return entry[0](x, t, context)
