"""Applying LoRAs to a loaded model: a per-request overlay, fusing into the weights, and trainable layers.

Each LoRA is used with two multipliers, as A1111's `<lora:name:te:unet>`: `te` for the text encoders'
layers and `unet` for the U-Net's. Several LoRAs add up: W' = W + Σ_i m_i · (α_i / r_i) · up_i · down_i.

- `overlay(model, uses)`: a context manager that adds the LoRAs to the patched layers' outputs
  through forward hooks, y = layer(x) + up(down(x)) · m·α/r (or, where the rank makes that dear,
  runs the layer on a patched copy of its weight), and undoes it on exit. The weights are never
  written, so a server can give each request its own LoRAs without reloading or leaking.
- `fuse(model, uses)`: W += m · (α/r) · up · down, in place: free at sampling time, and the model
  can then be saved as a new checkpoint.
- `attach_trainable(...)`: fresh down/up parameters on chosen targets, applied by the same hooks,
  that a trainer optimises and `TrainableLora.to_lora()` turns into a Lora (save it with
  lora_files.save_kohya).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from marble.adapters.lora_files import Lora, LoraLayer, delta_weight
from marble.adapters.lora_table import ModuleTable, Target, module_table
from marble.models.weight_cast import compute_dtype


@dataclass(frozen=True)
class LoraUse:
    """One LoRA as a request uses it."""
    lora: Lora
    te: float = 1.0        # multiplier on the text encoders' layers
    unet: float = 1.0      # multiplier on the U-Net's layers

    def multiplier(self, target: Target) -> float:
        return self.unet if target.component == "unet" else self.te


def _table(model: nn.Module, table: ModuleTable | None) -> ModuleTable:
    return table if table is not None else module_table(model)


def _patches(table: ModuleTable, uses: Sequence[LoraUse]) -> dict[str, list[tuple[LoraLayer, float]]]:
    """Canonical module name -> [(layer, m · α/r)], skipping zero multipliers."""
    patches: dict[str, list[tuple[LoraLayer, float]]] = {}
    for use in uses:
        for name, layer in use.lora.layers.items():
            if name not in table.targets:   # a Lora read for another model
                raise ValueError(f"LoRA {use.lora.name} patches {name}, which this model does not have")
            m = use.multiplier(table.targets[name])
            if m:
                patches.setdefault(name, []).append((layer, m * layer.scale))
    return patches


def lora_branch(module: nn.Module, down: torch.Tensor, up: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> up(down(x)) for `module`: linear maps for a Linear; for a Conv2d, down convolves with the
    layer's stride, padding and dilation (its kernel is the layer's) and up is a 1×1 convolution."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ValueError("LoRA on grouped or non-zero-padded convolutions is not supported")
        return lambda x: F.conv2d(F.conv2d(x, down, None, module.stride, module.padding, module.dilation), up)
    return lambda x: F.linear(F.linear(x, down), up)


def _add_output(branch: Callable[[torch.Tensor], torch.Tensor]):
    def hook(module, args, output):
        return output + branch(args[0])
    return hook


COPY_ABOVE = 1 / 16


def _materialise(weight: torch.Tensor, rank: int, copy_above: float) -> bool:
    """Whether a layer should run with a patched copy of its weight rather than the low-rank branch:
    the branch costs rank·(in·kh·kw + out) multiply-adds per position against the layer's
    out·in·kh·kw, so past a fraction of the layer (1/16: rank ≳ 10 on a 320-wide attention
    projection) a copy, computed once per request, is cheaper per step. It costs the copy's memory."""
    return rank * (weight[0].numel() + weight.shape[0]) > copy_above * weight.numel()


@contextmanager
def overlay(model: nn.Module, uses: Sequence[LoraUse], table: ModuleTable | None = None,
            copy_above: float = COPY_ABOVE) -> Iterator[None]:
    """Inside the block the model computes with the LoRAs added; outside it is the base model again,
    its weights never written. Low-rank layers get a forward hook, y = layer(x) + up(down(x)), with
    all LoRAs on a layer stacked into one down (Σr, in) and one up (out, Σr), multipliers folded
    into up. Layers where that branch would cost more than `copy_above` of the layer run with a
    patched copy W + ΔW instead, the original Parameter put back on exit (see _materialise;
    math.inf: hooks only, 0: copies only). The patch is on the model object itself, so one model
    runs one request at a time (the server's one worker per model does)."""
    table = _table(model, table)
    handles, swapped = [], []
    try:
        with torch.no_grad():
            for name, items in _patches(table, uses).items():
                module = table.targets[name].module
                w = module.weight
                if _materialise(w, sum(layer.rank for layer, _ in items), copy_above):
                    delta = sum(delta_weight(layer.down, layer.up) * s for layer, s in items)
                    swapped.append((module, w))
                    module.weight = nn.Parameter((w.float() + delta.to(w.device)).to(w.dtype), requires_grad=False)
                    continue
                dtype = compute_dtype(module)   # the weight's, or float32 for weights stored in fp16 (weight_cast)
                down = torch.cat([layer.down for layer, _ in items]).to(w.device, dtype)
                up = torch.cat([layer.up.float() * s for layer, s in items], dim=1).to(w.device, dtype)
                handles.append(module.register_forward_hook(_add_output(lora_branch(module, down, up))))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, weight in swapped:
            module.weight = weight


@torch.no_grad()
def fuse(model: nn.Module, uses: Sequence[LoraUse], table: ModuleTable | None = None) -> None:
    """W += Σ m · (α/r) · up · down, in place (computed in float32, stored in the weight's dtype).
    Every ΔW is computed before the first weight is written, so an error leaves the model as it was."""
    table = _table(model, table)
    deltas = {}
    for name, items in _patches(table, uses).items():
        weight = table.targets[name].module.weight
        deltas[name] = sum(delta_weight(layer.down, layer.up) * s for layer, s in items).to(weight.device)
    for name, delta in deltas.items():
        weight = table.targets[name].module.weight
        weight.copy_((weight.float() + delta).to(weight.dtype))


class TrainableLora(nn.Module):
    """Trainable down/up pairs on chosen targets, applied through forward hooks while attached.
    Initialised as kohya's trainer does: down Kaiming-uniform, up zero, so training starts at the base model."""

    def __init__(self, table: ModuleTable, targets: Sequence[Target], rank: int, alpha: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, not {rank}")
        self.table, self.rank, self.alpha = table, rank, float(alpha)
        self.names = [t.name for t in targets]
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for t in targets:
            w = t.module.weight
            down_shape = (rank, *w.shape[1:]) if w.ndim == 4 else (rank, w.shape[1])
            up_shape = (w.shape[0], rank, 1, 1) if w.ndim == 4 else (w.shape[0], rank)
            down = torch.empty(down_shape, device=w.device)
            bound = 1 / math.sqrt(math.prod(down_shape[1:]))   # kaiming_uniform_(a=√5)'s bound
            down.uniform_(-bound, bound, generator=generator)
            self.down.append(nn.Parameter(down))
            self.up.append(nn.Parameter(torch.zeros(up_shape, device=w.device)))
        self._handles: list = []

    def attach(self) -> "TrainableLora":
        self.detach()
        scale = self.alpha / self.rank
        for name, down, up in zip(self.names, self.down, self.up):
            module = self.table.targets[name].module
            branch = lora_branch(module, down, up)
            self._handles.append(module.register_forward_hook(
                _add_output(lambda x, b=branch, dtype=compute_dtype(module): (b(x.float()) * scale).to(dtype))))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def to_lora(self, name: str) -> Lora:
        layers = {n: LoraLayer(d.detach().float().cpu().clone(), u.detach().float().cpu().clone(), self.alpha)
                  for n, d, u in zip(self.names, self.down, self.up)}
        return Lora(name, layers)


def attach_trainable(model: nn.Module, kinds: Sequence[str] = ("attention",), rank: int = 8,
                     alpha: float | None = None, table: ModuleTable | None = None,
                     generator: torch.Generator | None = None) -> TrainableLora:
    """New trainable LoRA layers (float32) on the model's targets of `kinds` (lora_table.KINDS), attached.
    alpha defaults to rank (scale 1)."""
    table = _table(model, table)
    targets = table.select(list(kinds))
    if not targets:
        raise ValueError(f"the model has no LoRA targets of kinds {list(kinds)}")
    return TrainableLora(table, targets, rank, rank if alpha is None else alpha, generator).attach()
