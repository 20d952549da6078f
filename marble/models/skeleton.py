"""Networks built as shapes only, for weights about to be loaded.

`with skeleton():` constructs modules on the meta device and skips their default initialisation.
Meta tensors allocate nothing, so loading peaks near the size of the weights. Skipping the
initialisation saves more than its arithmetic: the meta kernels of `normal_` and friends are
Python decompositions that import torch._dynamo, about 2 s of a cold `marble generate`.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode


class _SkipInit(TorchFunctionMode):
    """torch.nn.init functions hand their tensor back untouched; everything else runs as usual.
    A torch-function mode is thread-local, so other threads keep initialising normally."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@contextmanager
def skeleton():
    with torch.device("meta"), _SkipInit():
        yield
