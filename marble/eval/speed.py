"""Speed of a model through the whole pipeline: warm time per image and cold CLI wall time.

Medians of repeated runs, measured side by side in one process (this machine is noisy).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from marble.cpu_features import cpu_name

PROMPT = "two red circles above a blue square"


@dataclass
class SpeedReport:
    model: str
    settings: str
    warm_image_s: list[float]
    cold_cli_s: list[float]
    cpu: str = field(default_factory=cpu_name)
    warm_traced_s: list[float] = field(default_factory=list)   # with --trace, interleaved with warm_image_s

    def rows(self) -> list[tuple[str, str]]:
        med = statistics.median
        out = [("settings", self.settings), ("CPU", self.cpu),
               ("one image, warm (median of %d)" % len(self.warm_image_s), f"{med(self.warm_image_s):.3f} s")]
        if self.warm_traced_s:
            out.append(("one image, warm, traced U-Net (median of %d, interleaved)" % len(self.warm_traced_s),
                        f"{med(self.warm_traced_s):.3f} s"))
        if self.cold_cli_s:
            out.append(("`marble generate`, cold, wall (median of %d)" % len(self.cold_cli_s),
                        f"{med(self.cold_cli_s):.2f} s"))
        return out

    def to_json(self) -> str:
        med = statistics.median
        return json.dumps({"model": self.model, "settings": self.settings, "cpu": self.cpu,
                           "warm_image_s": self.warm_image_s, "warm_image_median_s": med(self.warm_image_s),
                           "cold_cli_s": self.cold_cli_s, "warm_traced_s": self.warm_traced_s,
                           "cold_cli_median_s": med(self.cold_cli_s) if self.cold_cli_s else None}, indent=2)

    def markdown(self) -> str:
        lines = [f"| {self.model} | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.rows()]
        return "\n".join(lines)


def measure(model: str = "builtin", runs: int = 7, cold_runs: int = 3, threads: int | None = None,
            trace: bool = False, dtype=None) -> SpeedReport:
    """`dtype`: the compute dtype (None: float32), for the warm images and the cold CLI runs alike."""
    import torch

    from marble.cpu_features import dtype_name
    from marble.pipeline import load_pipeline
    from marble.request import GenerationRequest, resolve

    dtype = torch.float32 if dtype is None else dtype
    if threads:
        torch.set_num_threads(threads)
    pipe = load_pipeline(model, dtype=dtype)
    request = GenerationRequest(prompt=PROMPT, seed=0)
    resolved = resolve(request, pipe.defaults)
    pipes = [pipe] + ([load_pipeline(model, dtype=dtype, trace=True)] if trace else [])
    for p in pipes:
        p.generate(resolved)  # warm-up: first calls allocate, pick kernels and trace
    times: list[list[float]] = [[] for _ in pipes]
    for i in range(runs):
        for p, warm in zip(pipes, times):
            t0 = time.perf_counter()
            p.generate(resolve(GenerationRequest(prompt=PROMPT, seed=i), p.defaults))
            warm.append(time.perf_counter() - t0)
    cold = []
    with tempfile.TemporaryDirectory() as out:
        for i in range(cold_runs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "marble", "generate", PROMPT, "--model", model, "--seed", str(i),
                            "--dtype", dtype_name(dtype),
                            "--out", out], check=True, capture_output=True)
            cold.append(time.perf_counter() - t0)
    settings = (f"{resolved.width}x{resolved.height}, {resolved.sampler}, {resolved.steps} steps, "
                f"CFG {resolved.cfg:g}, {dtype_name(dtype)}, {torch.get_num_threads()} threads")
    return SpeedReport(model, settings, times[0], cold, warm_traced_s=times[1] if trace else [])
