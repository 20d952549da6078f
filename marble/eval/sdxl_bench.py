"""`marble bench --arch sdxl`: one SDXL U-Net step at 1024² (CFG batch 2) and one VAE decode, in
marble and in diffusers on the same random weights, each side in its own subprocess so that its
peak RSS is its own.

The weights are drawn per tensor in float32 from one seed and rounded to the storage dtype marble
keeps them in (fp16 by default: marble.models.weight_cast), so both sides compute in float32 on
identical values: diffusers holds them as float32 tensors, marble in fp16 and casts per layer.
Nothing is downloaded; the text encoders are not built (the step takes a random context and y).
Reported: seconds per U-Net step and per decode, weight bytes and peak RSS of each side, and the
relative difference of the two U-Net outputs (a parity check at full size).

`low_memory` (marble's side, `--low-memory`): the weights are written once to a temporary
safetensors file and loaded back as views of its memory map (tensor_file.map_tensors); the VAE's
pages are released before the U-Net calls and the U-Net's before the decodes (tensor_file.release),
as `marble generate --low-memory` does between stages.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from marble.cpu_features import cpu_name

Log = Callable[[str], None]
SIDES = ("marble", "diffusers")


@dataclass
class SdxlBenchSettings:
    size: int = 1024              # pixels per side
    weights: str = "fp16"         # marble's storage dtype (weight_cast.STORAGE_DTYPES); diffusers runs float32
    unet_calls: int = 1           # timed U-Net calls (median), after one warm-up call when `warmup`
    decodes: int = 1              # timed VAE decodes (median), after one warm-up when `warmup`
    warmup: bool = True           # one untimed call first (oneDNN picks and caches kernels)
    seed: int = 0
    threads: int | None = None
    config: dict | None = None    # a LatentDiffusionConfig as a dict (tests: a tiny SDXL); None: SDXL base
    low_memory: bool = False      # marble: file-backed weights, each network's pages released while the other runs


@dataclass
class SideResult:
    side: str
    unet_step_s: float
    vae_decode_s: float
    weights_gb: float             # U-Net + VAE as held in memory
    peak_rss_gb: float            # the process's peak RSS while generating (U-Net step and decode), weights included
    build_s: float
    threads: int
    build_peak_gb: float = 0.0    # the process's peak RSS while building (reset afterwards)
    unet_peak_gb: float = 0.0     # ... during the U-Net calls
    decode_peak_gb: float = 0.0   # ... during the decodes
    released_gb: float = 0.0      # low_memory: the U-Net's mapped pages handed back before the decodes
    output: np.ndarray | None = field(default=None, repr=False)   # the U-Net output, float32


def _config(s: SdxlBenchSettings):
    from marble.config import config_from_dict
    from marble.models.latent_diffusion import LatentDiffusionConfig
    from marble.models.stable_diffusion import sdxl_config
    return sdxl_config("sdxl-base") if s.config is None else config_from_dict(LatentDiffusionConfig, s.config)


@torch.no_grad()
def random_networks(config, seed: int, storage: torch.dtype):
    """The U-Net and VAE of `config` with seeded random weights, each tensor drawn in float32 (the
    scheme of resolve.random_model) and stored in `storage`: never the whole model in float32."""
    from marble.eval.sd_bench import draw_weight
    from marble.models.skeleton import skeleton
    from marble.models.unet import UNet
    from marble.models.vae import AutoencoderKL
    with skeleton():
        unet, vae = UNet(config.unet), AutoencoderKL(config.vae)
    g = torch.Generator().manual_seed(seed)
    for net in (unet, vae):
        for module in net.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                t = draw_weight(module, name, torch.empty(p.shape), g)
                setattr(module, name, torch.nn.Parameter(t.to(storage), requires_grad=False))
        if any(b.is_meta for b in net.buffers()):
            raise RuntimeError("a network kept a buffer on the meta device")
    return unet.eval(), vae.eval()


def file_backed(config, unet, vae, folder: Path):
    """Networks like `unet` and `vae` whose weights are views of a safetensors file's memory map:
    theirs written once (streamed) to `folder`, then mapped back (nothing is read until used)."""
    from marble.fileio import write_new
    from marble.models.skeleton import skeleton
    from marble.models.unet import UNet
    from marble.models.vae import AutoencoderKL
    from marble.tensor_file import map_tensors, read_header, safetensors_writer
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
    path = write_new(folder / "weights.safetensors", safetensors_writer(state))
    with skeleton():
        unet, vae = UNet(config.unet), AutoencoderKL(config.vae)
    mapped = dict(map_tensors(read_header(path)))
    for prefix, net in (("unet.", unet), ("vae.", vae)):
        net.load_state_dict({k[len(prefix):]: v for k, v in mapped.items() if k.startswith(prefix)}, assign=True)
    return unet.eval().requires_grad_(False), vae.eval().requires_grad_(False)


def _inputs(config, size: int):
    """The step's inputs: a latent, CFG-batched; t; context; the pooled text and the six size numbers."""
    g = torch.Generator().manual_seed(1)
    latent = size // config.latent_factor
    x = torch.randn(1, config.unet.in_channels, latent, latent, generator=g)
    context = torch.randn(2, 77, config.unet.context_dim, generator=g)
    pooled_dim = config.unet.adm_in_channels - 6 * config.vector.fourier_dim
    pooled = torch.randn(2, pooled_dim, generator=g)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
    return torch.cat([x, x]), torch.tensor([500.0, 500.0]), context, pooled, time_ids, x


def _median(fn, n: int, warmup: bool) -> tuple[float, object]:
    out = fn() if warmup else None
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def malloc_trim() -> None:
    """Hand the C heap's free pages back to the kernel (glibc): the per-tensor float32 draws of the
    build leave holes between the fp16 weights that RSS keeps counting otherwise."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_gb() -> float:
    """Peak RSS since the last reset_peak, in GB (10⁹ bytes, the unit of weights_gb)."""
    from marble.eval.sd_bench import rss_gb
    return rss_gb() * 2**30 / 1e9


def run_side(side: str, s: SdxlBenchSettings, output: Path | None = None) -> SideResult:
    """One side, in this process: build, one U-Net step and one decode, timed."""
    if side == "marble" and s.low_memory:
        with tempfile.TemporaryDirectory(prefix="marble-sdxl-bench-") as folder:   # removed once the side is done
            return _run_side(side, s, output, Path(folder))
    return _run_side(side, s, output, None)


@torch.inference_mode()
def _run_side(side: str, s: SdxlBenchSettings, output: Path | None, folder: Path | None) -> SideResult:
    from marble.eval.sd_bench import reset_peak
    from marble.models.conditioning import fourier_features
    from marble.models.weight_cast import store_weights, storage_dtype
    from marble.tensor_file import release
    if s.threads:
        torch.set_num_threads(s.threads)
    config = _config(s)
    storage = storage_dtype(s.weights)
    t0 = time.perf_counter()
    unet, vae = random_networks(config, s.seed, storage)
    if folder is not None:
        unet, vae = file_backed(config, unet, vae, folder)   # the in-memory weights die here
    x2, t, context, pooled, time_ids, x = _inputs(config, s.size)
    if side == "marble":
        store_weights(unet, storage)
        store_weights(vae, storage)
        y = torch.cat([pooled, fourier_features(time_ids, config.vector.fourier_dim)], dim=1)
        step = lambda: unet(x2, t, context, y=y)   # noqa: E731
        decode = lambda: vae.decode(x)             # noqa: E731
    else:
        unet, vae = _diffusers_networks(config, unet, vae)
        step = lambda: unet(x2, t, encoder_hidden_states=context,   # noqa: E731
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        decode = lambda: vae.decode(x / config.vae.scaling_factor).sample   # noqa: E731
    weights = sum(p.numel() * p.element_size() for net in (unet, vae) for p in net.parameters()) / 1e9
    build = time.perf_counter() - t0
    malloc_trim()
    build_peak = _rss_gb()
    release(vae.parameters())         # file-backed weights only (low_memory): the stage to come's pages, alone
    reset_peak()                      # from here the peak is the generation's, one phase at a time
    unet_s, out = _median(step, s.unet_calls, s.warmup)
    unet_peak = _rss_gb()
    released = release(unet.parameters()) / 1e9
    reset_peak()
    decode_s, _ = _median(decode, s.decodes, s.warmup)
    decode_peak = _rss_gb()
    if output is not None:
        np.save(output, out.float().numpy(), allow_pickle=False)
    return SideResult(side, unet_s, decode_s, weights, max(unet_peak, decode_peak), build, torch.get_num_threads(),
                      build_peak, unet_peak, decode_peak, released)


def _diffusers_networks(config, unet, vae):
    """diffusers' UNet2DConditionModel and AutoencoderKL holding the same values in float32 (each
    tensor widened as it is handed over, so the float32 copy is built once)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from marble.checkpoints.diffusers_folder import (rename, unet_config_to_diffusers, unet_table,
                                                     vae_config_to_diffusers, vae_table, vae_to_diffusers_tensor)
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}   # noqa: E731
    with torch.device("meta"):
        theirs_unet = UNet2DConditionModel(**strip(unet_config_to_diffusers(
            config.unet, config.default_height // config.latent_factor, config.vector)))
        theirs_vae = AutoencoderKL(**strip(vae_config_to_diffusers(config.vae, config.default_height)))
    ut, vt = unet_table(config.unet), vae_table(config.vae)
    state = unet.state_dict()
    del unet
    theirs_unet.load_state_dict({rename(k, ut): state.pop(k).float() for k in list(state)}, assign=True)
    state = vae.state_dict()
    del vae
    theirs_vae.load_state_dict({rename(k, vt): vae_to_diffusers_tensor(k, state.pop(k).float()) for k in list(state)},
                               assign=True)
    return theirs_unet.eval(), theirs_vae.eval()


# --- the parent: one subprocess per side -----------------------------------------------------------

@dataclass
class SdxlBenchReport:
    settings: SdxlBenchSettings
    sides: dict[str, SideResult]
    unet_rel_diff: float | None = None   # max |marble − diffusers| / max |diffusers| of the U-Net outputs
    cpu: str = ""

    def ratios(self) -> dict[str, float]:
        if set(self.sides) != set(SIDES):
            return {}
        m, d = self.sides["marble"], self.sides["diffusers"]
        return {"unet_step_s": m.unet_step_s / d.unet_step_s, "vae_decode_s": m.vae_decode_s / d.vae_decode_s}

    def markdown(self) -> str:
        s = self.settings
        marble = f"marble ({s.weights} weights, fp32 compute" if s.weights != "fp32" else "marble (fp32"
        marble += ", --low-memory)" if s.low_memory else ")"
        cols = [("marble fp32" if marble == "marble (fp32)" else marble, self.sides.get("marble")), ("diffusers fp32", self.sides.get("diffusers"))]
        cols = [(n, r) for n, r in cols if r is not None]
        lines = [f"SDXL base U-Net + VAE, random weights, {s.size}×{s.size}, "
                 f"{next(iter(self.sides.values())).threads} threads{', ' + self.cpu if self.cpu else ''}", "",
                 "| | " + " | ".join(n for n, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        rows = [("U-Net step (CFG batch 2)", lambda r: f"{r.unet_step_s:.2f} s"),
                (f"VAE decode {s.size}²", lambda r: f"{r.vae_decode_s:.2f} s"),
                ("weights (U-Net + VAE)", lambda r: f"{r.weights_gb:.2f} GB"),
                ("peak RSS, U-Net step", lambda r: f"{r.unet_peak_gb:.2f} GB ({r.unet_peak_gb / r.weights_gb:.2f}×)"),
                ("peak RSS, VAE decode", lambda r: f"{r.decode_peak_gb:.2f} GB ({r.decode_peak_gb / r.weights_gb:.2f}×)"),
                ("peak RSS / weights", lambda r: f"{r.peak_rss_gb / r.weights_gb:.2f}×"),
                ("peak RSS, build (before the reset)", lambda r: f"{r.build_peak_gb:.2f} GB")]
        if s.low_memory:
            rows.append(("released before the decode (--low-memory)", lambda r: f"{r.released_gb:.2f} GB"))
        for label, fmt in rows:
            lines.append(f"| {label} | " + " | ".join(fmt(r) for _, r in cols) + " |")
        extra = []
        if self.ratios():
            extra.append("marble / diffusers: " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}×"
                                                            for k, v in self.ratios().items()))
        if self.unet_rel_diff is not None:
            extra.append(f"U-Net outputs, marble vs diffusers on the same weights: {self.unet_rel_diff:.1e} relative")
        return "\n".join(lines + [""] + extra)

    def to_json(self) -> str:
        sides = {k: {f: getattr(v, f) for f in ("unet_step_s", "vae_decode_s", "weights_gb", "peak_rss_gb", "build_s",
                                                 "threads", "build_peak_gb", "unet_peak_gb", "decode_peak_gb",
                                                 "released_gb")}
                 for k, v in self.sides.items()}
        return json.dumps({"settings": asdict(self.settings), "cpu": self.cpu, "sides": sides,
                           "marble_over_diffusers": self.ratios(), "unet_rel_diff": self.unet_rel_diff}, indent=2)


def run_sdxl_bench(s: SdxlBenchSettings, log: Log = print, diffusers: bool = True) -> SdxlBenchReport:
    """Each side in a fresh `python -m marble.eval.sdxl_bench` (this interpreter, this PYTHONPATH)."""
    sides = SIDES if diffusers else SIDES[:1]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in sides:
            log(f"{side}: building and timing in a subprocess ...")
            out = Path(tmp) / f"{side}.npy"
            proc = subprocess.run([sys.executable, "-m", "marble.eval.sdxl_bench", side, json.dumps(asdict(s)),
                                   str(out)], capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode != 0:
                raise RuntimeError(f"the {side} side failed: {proc.stderr.strip()[-2000:]}")
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            results[side] = SideResult(**data, output=np.load(out, allow_pickle=False))
            r = results[side]
            log(f"  U-Net step {r.unet_step_s:.2f} s, VAE decode {r.vae_decode_s:.2f} s, peak RSS {r.peak_rss_gb:.2f} GB")
    report = SdxlBenchReport(s, results, cpu=cpu_name())
    if diffusers:
        a, b = results["marble"].output, results["diffusers"].output
        report.unet_rel_diff = float(np.abs(a - b).max() / np.abs(b).max())
    return report


def main(argv: list[str]) -> None:
    side, settings, output = argv
    if side not in SIDES:
        raise SystemExit(f"side must be one of {SIDES}")
    result = run_side(side, SdxlBenchSettings(**json.loads(settings)), Path(output))
    print(json.dumps({k: v for k, v in asdict(result).items() if k != "output"}))


if __name__ == "__main__":
    main(sys.argv[1:])
