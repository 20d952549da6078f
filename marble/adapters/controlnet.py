"""Applying ControlNets: control units, the control image's preparation, and the denoiser closure.

A unit is one ControlNet with its control image, weight (conditioning scale), guidance start/end
(fractions of the steps, diffusers' rule: step i of n is controlled when i/n ≥ start and
(i + 1)/n ≤ end), control mode and resize mode, as sd-webui-controlnet names them:
  Balanced                        every residual × weight, on both halves of CFG;
  My prompt is more important     residual i of n × weight · 0.825^(n − 1 − i) (its "soft injection";
                                  SD1.5's 13 residuals: 0.825^(12 − i), the middle block's × 1);
  ControlNet is more important    soft injection, and the control only on the conditional half of
                                  CFG (its "cfg injection"), so guidance pushes towards the control.
Several units add their residuals (diffusers' MultiControlNetModel). The residuals are computed per
call inside the denoiser closure (`controlled_denoiser`); samplers and guidance stay as they are:
the guidance closure marks its halves with `cond_mark` (1 conditional, 0 unconditional).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from marble.adapters.file_cache import FileCache
from marble.diffusion.denoiser import Denoiser
from marble.errors import ModelLoadError
from marble.models.unet import UNetConfig
from marble.models.weight_cast import store_weights
from marble.prompts.conditioning import step_index

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
SOFT_BASE = 0.825                # sd-webui-controlnet's soft-injection decay per residual
CONTROL_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
# what users and API clients send for each mode (sd-webui-controlnet accepts the index and the name)
_MODE_ALIASES = {"0": 0, "balanced": 0, "1": 1, "prompt": 1, "my prompt is more important": 1,
                 "2": 2, "control": 2, "controlnet": 2, "controlnet is more important": 2}
_RESIZE_ALIASES = {"0": 0, "just resize": 0, "just_resize": 0, "resize": 0, "1": 1, "crop and resize": 1,
                   "crop_and_resize": 1, "crop": 1, "2": 2, "resize and fill": 2, "resize_and_fill": 2, "fill": 2,
                   "inner fit (scale to fit)": 1, "outer fit (shrink to fit)": 2, "envelope (outer fit)": 2,
                   "scale to fit (inner fit)": 1}


def control_mode(value) -> str:
    """A control mode by name, alias or index -> its canonical name; ValueError names the choices."""
    key = str(value).strip().lower()
    if isinstance(value, bool) or key not in _MODE_ALIASES:
        raise ValueError(f"unknown control mode {value!r}; choose from {', '.join(CONTROL_MODES)} (or 0, 1, 2)")
    return CONTROL_MODES[_MODE_ALIASES[key]]


def resize_mode(value) -> str:
    key = str(value).strip().lower()
    if isinstance(value, bool) or key not in _RESIZE_ALIASES:
        raise ValueError(f"unknown resize mode {value!r}; choose from {', '.join(RESIZE_MODES)} (or 0, 1, 2)")
    return RESIZE_MODES[_RESIZE_ALIASES[key]]


@dataclass(frozen=True)
class ControlSpec:
    """One control unit as a request names it (not yet read)."""
    image: Image.Image | None = field(default=None, compare=False, repr=False)   # the control image (or the input of `module`)
    model: str = ""                   # a name in the ControlNet folder, or a file path (is_path)
    module: str = "none"              # preprocessor (marble.adapters.preprocess)
    weight: float = 1.0               # conditioning scale, [0, 2]
    start: float = 0.0                # guidance start, fraction of the steps, [0, 1]
    end: float = 1.0                  # guidance end, (start, 1]
    mode: str = "Balanced"            # CONTROL_MODES
    resize: str = "Crop and Resize"   # RESIZE_MODES (sd-webui-controlnet's default)
    is_path: bool = False             # True: `model` is a path the local user gave, not confined to the folder
    image_path: str | None = None     # recorded for --from
    image_sha256: str | None = None
    threshold_a: float | None = None  # preprocessor parameters (canny: low threshold; scribble: threshold)
    threshold_b: float | None = None  # canny: high threshold
    processor_res: int | None = None  # the preprocessor's resolution (short side, px); None: 512
    pixel_perfect: bool = False       # True: processor_res from the image and output sizes (pixel_perfect_resolution)


# --- the control image -----------------------------------------------------------------------------

def _border_median(arr: np.ndarray) -> np.ndarray:
    borders = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]], axis=0)
    return np.median(borders, axis=0).astype(arr.dtype)


def resize_control(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """The control image at the generation size, as sd-webui-controlnet fits it:
    Just Resize stretches; Crop and Resize scales to cover and crops the centre; Resize and Fill
    scales to fit inside and fills the rest with the median colour of the image's border."""
    image = image.convert("RGB")
    w0, h0 = image.size
    if mode == "Just Resize" or (w0, h0) == (width, height):
        return image if (w0, h0) == (width, height) else image.resize((width, height), Image.LANCZOS)
    if mode == "Crop and Resize":
        k = max(width / w0, height / h0)
        nw, nh = max(width, round(w0 * k)), max(height, round(h0 * k))
        scaled = image.resize((nw, nh), Image.LANCZOS)
        left, top = (nw - width) // 2, (nh - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    k = min(width / w0, height / h0)
    nw, nh = min(width, max(1, round(w0 * k))), min(height, max(1, round(h0 * k)))
    fill = tuple(int(v) for v in _border_median(np.asarray(image)))
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(image.resize((nw, nh), Image.LANCZOS), ((width - nw) // 2, (height - nh) // 2))
    return canvas


def pixel_perfect_resolution(image_size: tuple[int, int], width: int, height: int, mode: str) -> int:
    """sd-webui-controlnet's pixel perfect preprocessor resolution for an image of `image_size` (w, h)
    made into a width × height control map: the image's short side times the scale the resize mode
    applies (Resize and Fill: the smaller of the two axis scales, so the image fits inside; Just Resize
    and Crop and Resize: the larger, so it covers), rounded half to even as numpy's round."""
    w0, h0 = image_size
    k_h, k_w = height / h0, width / w0
    k = min(k_h, k_w) if mode == "Resize and Fill" else max(k_h, k_w)
    return int(round(k * min(w0, h0)))


def hint_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) in [0, 1]: what ControlNets read (cldm and diffusers alike)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


# --- residuals and the denoiser --------------------------------------------------------------------

def soft_scales(n: int) -> tuple[float, ...]:
    """sd-webui-controlnet's soft injection: residual i of n × 0.825^(n − 1 − i)."""
    return tuple(SOFT_BASE ** float(n - 1 - i) for i in range(n))


@dataclass
class ActiveUnit:
    """A unit ready to run: its network, its hint at the generation size, and how its residuals scale.
    `scales`: one factor per residual (None: all 1); `cond_only`: the conditional half of CFG only."""
    net: nn.Module
    hint: torch.Tensor                 # (1, 3, H, W) in [0, 1], the model's device and dtype
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    scales: tuple[float, ...] | None = None
    cond_only: bool = False

    @classmethod
    def of_mode(cls, net: nn.Module, hint: torch.Tensor, weight: float, start: float, end: float,
                mode: str) -> "ActiveUnit":
        n = len(net.zero_convs) + 1
        soft = mode != "Balanced"
        return cls(net, hint, weight, start, end, soft_scales(n) if soft else None,
                   mode == "ControlNet is more important")

    def active(self, step: int, steps: int) -> bool:
        """diffusers' control_guidance_start/end rule for step `step` (from 0) of `steps`."""
        return not (step / steps < self.start or (step + 1) / steps > self.end)

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                  cond_mark: torch.Tensor | None) -> list[torch.Tensor]:
        rows = None
        if self.cond_only and cond_mark is not None and not bool((cond_mark > 0).all()):
            rows = (cond_mark > 0).nonzero().reshape(-1)
        xs, ts, cs, ys = x, t, context, y
        if rows is not None:   # run the ControlNet on the conditional rows only (diffusers' guess mode does too)
            t_full = t.reshape(-1).expand(x.shape[0])
            xs, ts, cs = x[rows], t_full[rows], context[rows]
            ys = None if y is None else y[rows]
        hint = self.hint.expand(xs.shape[0], -1, -1, -1)
        out = self.net(xs, ts, cs, hint, ys)
        scales = self.scales or (1.0,) * len(out)
        out = [r * (self.weight * s) for r, s in zip(out, scales)]
        if rows is not None:
            full = []
            for r in out:
                z = r.new_zeros((x.shape[0], *r.shape[1:]))
                z[rows] = r
                full.append(z)
            out = full
        return out


def controlled_denoiser(model, units: list[ActiveUnit], sigmas: torch.Tensor) -> Denoiser:
    """model.denoiser with the units' residuals added to the U-Net, for the sigmas of one pass.
    Called as D(x, sigma, context=..., cond_mark=..., **cond); without units it is model.denoiser."""
    steps = len(sigmas) - 1
    unet = model.unet

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond_mark: torch.Tensor | None = None, **cond) -> torch.Tensor:
        step = step_index(sigmas, sigma) if steps else 0
        active = [u for u in units if u.active(step, max(steps, 1))]
        if not active:
            return model.denoiser(x, sigma, **cond)

        def network(x_in, t, context, concat=None, y=None):
            control = None
            for unit in active:
                r = unit.residuals(x_in, t, context, y, cond_mark)
                control = r if control is None else [a + b for a, b in zip(control, r)]
            return unet(x_in, t, context, concat, y, control=control)

        return model.denoiser_for(network)(x, sigma, **cond)

    return denoise


# --- files by name ---------------------------------------------------------------------------------

def resolve_controlnet(name: str, folder: Path) -> Path:
    """A ControlNet name (A1111's model_list entry: a file stem, optionally with " [hash]", or a file or
    folder name) -> its path inside `folder`; never outside it."""
    clean = name.split(" [", 1)[0].strip() if name.endswith("]") else name.strip()
    if not clean or "/" in clean or "\\" in clean or clean in (".", "..") or "\x00" in clean:
        raise ModelLoadError(f"unknown ControlNet {name!r}: a name from the ControlNet folder is expected")
    root = folder.resolve()
    for candidate in [root / clean, *(root / (clean + s) for s in CONTROL_SUFFIXES)]:
        if candidate.exists() and candidate.resolve().parent == root:
            return candidate.resolve()
    raise ModelLoadError(f"unknown ControlNet {clean!r} (not in {folder})")


def list_controlnets(folder: Path) -> list[Path]:
    """The ControlNets a folder holds: files with a model suffix and diffusers folders, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if (p.is_file() and p.suffix.lower() in CONTROL_SUFFIXES) or (p / "config.json").is_file())


def default_controlnet_dir() -> Path:
    """$MARBLE_CONTROLNET_DIR, else models/controlnet."""
    from marble.checkpoints.resolve import models_dir
    env = os.environ.get("MARBLE_CONTROLNET_DIR")
    return Path(env) if env else models_dir() / "controlnet"


@dataclass
class LoadedControlNet:
    net: nn.Module
    name: str          # the file stem (or folder name)
    hash: str          # first 10 hex of the file's sha256
    path: Path


class ControlNetLoader:
    """ControlNets by name (inside `folder` only) or by path (the local user's), read once and kept
    (at most `keep`), each fitted to the model's U-Net: a file for another architecture is refused."""

    def __init__(self, model, folder: Path | None = None, allow_pickle: bool = False, keep: int = 4):
        self.model, self.allow_pickle = model, allow_pickle
        self.folder = Path(folder) if folder is not None else default_controlnet_dir()
        self._cache: FileCache[LoadedControlNet] = FileCache(keep)

    def path_of(self, spec: ControlSpec) -> Path:
        if spec.is_path:
            path = Path(spec.model).expanduser()
            if not path.exists():
                raise ModelLoadError(f"no ControlNet file at {path}")
            return path.resolve()
        return resolve_controlnet(spec.model, self.folder)

    def get(self, spec: ControlSpec) -> LoadedControlNet:
        path = self.path_of(spec)
        return self._cache.get(path, lambda: self._read(path))

    def _read(self, path: Path) -> LoadedControlNet:
        from marble.checkpoints.controlnet_files import load_controlnet, read_controlnet
        m = self.model
        if not isinstance(m.config.unet, UNetConfig):
            raise ModelLoadError(f"ControlNets steer U-Nets; this model's denoiser is a {type(m.unet).__name__}")
        cn = read_controlnet(path, allow_pickle=self.allow_pickle, unet=m.config.unet)
        if cn.config.hint_factor != m.latent_factor:
            raise ModelLoadError(f"the ControlNet {cn.name} reads control images at {cn.config.hint_factor}× the "
                                 f"latent size, this model's latent factor is {m.latent_factor}")
        if cn.config.unet.in_channels != m.latent_channels:
            raise ModelLoadError(f"the ControlNet {cn.name} takes {cn.config.unet.in_channels} input channels, "
                                 f"this model's latent has {m.latent_channels}")
        storage = next(m.unet.parameters()).dtype   # stored as the U-Net is (fp16 storage: fp16), computed in m.dtype
        net = load_controlnet(cn, storage).to(m.device)
        if storage != m.dtype:
            store_weights(net, storage, compute=m.dtype)
        return LoadedControlNet(net, cn.name, cn.hash, path)
