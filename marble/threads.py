"""CPU threads: how many torch uses, and how its OpenMP workers wait between parallel regions.

torch's CPU wheels run their kernels on GNU OpenMP (libgomp). Between two parallel regions an
idle worker spins (GOMP_SPINCOUNT iterations, 300000 by default) before it sleeps. On a quiet
machine that saves the wake-up; when another process competes for the cores, the spinning
worker takes a core the other thread needs and every region waits for a descheduled thread:
the built-in model's image took 5x longer with one busy process beside it, and a spin of 3000
iterations was 2.8-6.7x faster than the default under contention (docs/bench.md, "Threads").
libgomp reads its environment once, when torch is imported, so `quiet_spin()` must run first.
"""
from __future__ import annotations

import os
import sys

SPIN_COUNT = "3000"    # libgomp's spin before sleeping, in iterations; measured in docs/bench.md, "Threads"


def quiet_spin(environ=os.environ) -> bool:
    """Shorten OpenMP's busy wait, unless the user set the wait policy themselves. Returns False
    when torch is already imported (too late: libgomp has read its environment)."""
    if "torch" in sys.modules:
        return False
    if "OMP_WAIT_POLICY" not in environ:
        environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    return True


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads (None or 0: torch's default, one per core)."""
    if threads:
        import torch
        torch.set_num_threads(threads)
