"""Peak activation memory of a forward pass, counted on the meta device: no arithmetic, no RAM.

`LiveBytes` is a dispatch mode that sees every aten op, adds the bytes of each new storage an op
returns, and subtracts them when the last tensor on that storage dies, so `peak` is the largest
sum of live tensor storages during the pass (inputs already alive when the mode starts are not
counted). Run a model built with `skeleton()` on meta inputs and this is the activation peak at
any size, SDXL's 1024² included, in seconds. What it cannot see: scratch a kernel allocates for
itself (oneDNN's reordered weights, SDPA's per-thread blocks) and the allocator's fragmentation;
the RSS measured by `marble bench --arch sdxl` includes both.

    with LiveBytes() as live:
        unet(x, t, context, y=y)            # meta tensors
    live.peak, live.peaks_by_label
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0                             # bytes of storages alive now that the pass created
        self.peak = 0
        self.peaks_by_label: dict[str, int] = {}  # label -> peak above the live bytes at its start
        self._refs: dict[int, int] = {}           # storage key -> Python tensors on it
        self._label: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result on a storage the pass did not create (a weight's transpose,
        # an input) allocates nothing
        given = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                 if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, given)
        return out

    def _track(self, t: torch.Tensor, given: set[int]) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._refs and key in given:
            return
        if key not in self._refs:
            self._refs[key] = 0
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            if self._label:
                name, start, top = self._label[-1]
                self._label[-1] = (name, start, max(top, self.live))
        self._refs[key] += 1
        weakref.finalize(t, self._release, key, storage.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes

    @contextmanager
    def label(self, name: str):
        """Record the peak inside this block, above the live bytes at its start."""
        self._label.append((name, self.live, self.live))
        try:
            yield
        finally:
            name, start, top = self._label.pop()
            self.peaks_by_label[name] = max(self.peaks_by_label.get(name, 0), top - start)
            if self._label:   # the enclosing label saw this peak too
                outer, o_start, o_top = self._label[-1]
                self._label[-1] = (outer, o_start, max(o_top, top))


def label_children(live: LiveBytes, named: list[tuple[str, torch.nn.Module]]) -> None:
    """Wrap each module's forward in `live.label(name)`."""
    for name, module in named:
        forward = module.forward

        def wrapped(*args, _forward=forward, _name=name, **kwargs):
            with live.label(_name):
                return _forward(*args, **kwargs)
        module.forward = wrapped
