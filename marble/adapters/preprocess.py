"""ControlNet preprocessors that need no downloaded weights: a control image from an ordinary image.

  none       the image as given (already a control map)
  invert     255 − x: white-background line drawings to the white-on-black lines ControlNets read
  threshold  binarise the grey level at threshold_a (default 127): white above, black below
  scribble   a user's dark-on-light sketch: inverted, then binarised at threshold_a (default 127)
  canny      Canny edges (1986): 3×3 Sobel gradients, |gx| + |gy| magnitude, non-maximum suppression
             along the quantised direction, hysteresis between threshold_a (100) and threshold_b
             (200) — OpenCV's cv2.Canny defaults, which sd-webui-controlnet calls. Written here in
             ~30 lines of torch rather than adding opencv-python-headless (a 50 MB wheel) or
             scikit-image (which also blurs first, unlike cv2.Canny) for one filter.
  seg        a colour-coded segmentation map passed through (ADE20K colours; drawing it is the user's)
Depth, pose, normal, HED/lineart and MLSD detectors need trained weights that cannot be shipped
here: they are listed as unavailable rather than approximated.

Resolution (sd-webui-controlnet's processor_res): canny, threshold and scribble run on the image
resized so its short side is `resolution` pixels (default 512), as the extension's
resize_image_with_pad does (bicubic up, area down, the long side rounded); none, invert and seg
keep the image's size, as there. The caller then fits the map to the output size.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MODULES = ("none", "canny", "invert", "threshold", "scribble", "seg")
NEED_WEIGHTS = ("depth", "openpose", "normal_map", "lineart", "softedge_hed", "mlsd")
DEFAULTS = {"canny": (100.0, 200.0), "threshold": (127.0, None), "scribble": (127.0, None)}
PROCESSOR_RES = 512                               # the extension's default preprocessor resolution
PROCESSOR_RES_RANGE = (64, 2048)                  # its slider's range, which marble enforces
AT_RESOLUTION = ("canny", "threshold", "scribble")  # modules that run at processor_res


def module_name(name: str) -> str:
    """A preprocessor name as given -> marble's; ValueError for an unknown one or one needing weights."""
    key = str(name or "none").strip().lower()
    key = {"invert (from white bg & black line)": "invert", "scribble_thr": "scribble", "seg_pass": "seg",
           "binary": "threshold"}.get(key, key)
    if key in MODULES:
        return key
    if any(key.startswith(n.split("_")[0]) for n in NEED_WEIGHTS):
        raise ValueError(f"the preprocessor {name!r} needs downloaded weights, which marble does not have; "
                         f"use one of {', '.join(MODULES)} or pass a ready control map with module none")
    raise ValueError(f"unknown preprocessor {name!r}; choose from {', '.join(MODULES)}")


def _grey(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))


def _rgb(mask: torch.Tensor) -> Image.Image:
    arr = (mask.numpy() * 255).astype(np.uint8)
    return Image.fromarray(np.stack([arr] * 3, axis=-1))


def canny(grey: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(H, W) grey levels 0..255 -> (H, W) bool edges (see module docstring)."""
    x = F.pad(grey[None, None], (1, 1, 1, 1), mode="replicate")
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx = F.conv2d(x, sx[None, None])[0, 0]
    gy = F.conv2d(x, sx.T.contiguous()[None, None])[0, 0]
    mag = gx.abs() + gy.abs()
    # direction quantised to 0°, 45°, 90°, 135°; a pixel survives when no neighbour along it is larger
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    sector = ((angle + 22.5) // 45).long() % 4
    padded = F.pad(mag[None, None], (1, 1, 1, 1))[0, 0]
    h, w = mag.shape
    shifted = lambda dy, dx: padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]   # noqa: E731
    offsets = [((0, 1), (0, -1)), ((1, 1), (-1, -1)), ((1, 0), (-1, 0)), ((1, -1), (-1, 1))]
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for s, (a, b) in enumerate(offsets):
        keep |= (sector == s) & (mag >= shifted(*a)) & (mag > shifted(*b))
    mag = torch.where(keep, mag, torch.zeros_like(mag))
    strong, weak = mag > high, mag > low
    edges = strong
    while True:   # hysteresis: weak pixels joined (8-connected) to strong ones
        grown = F.max_pool2d(edges[None, None].float(), 3, 1, 1)[0, 0].bool() & weak
        if torch.equal(grown, edges):
            return edges
        edges = grown


def at_resolution(image: Image.Image, resolution: int) -> Image.Image:
    """`image` with its short side `resolution` px, the long side scaled alike and rounded (half to even,
    as numpy's round in the extension); bicubic when enlarging, area (box) averaging when shrinking."""
    w, h = image.size
    k = resolution / min(w, h)
    size = (round(w * k), round(h * k))
    if size == (w, h):
        return image
    return image.resize(size, Image.BICUBIC if k > 1 else Image.BOX)


def preprocess(image: Image.Image, module: str, threshold_a: float | None = None,
               threshold_b: float | None = None, resolution: int | None = None) -> Image.Image:
    """The control map `module` makes of `image` (RGB): at the image's size, or, for the modules in
    AT_RESOLUTION, with the short side at `resolution` when one is given (see the module docstring)."""
    module = module_name(module)
    if resolution is not None and module in AT_RESOLUTION:
        image = at_resolution(image.convert("RGB"), resolution)
    a, b = DEFAULTS.get(module, (None, None))
    a = a if threshold_a is None else threshold_a
    b = b if threshold_b is None else threshold_b
    if module in ("none", "seg"):
        return image.convert("RGB")
    if module == "invert":
        return Image.fromarray(255 - np.asarray(image.convert("RGB")))
    if module == "threshold":
        return _rgb(_grey(image) > a)
    if module == "scribble":
        return _rgb((255 - _grey(image)) > a)
    return _rgb(canny(_grey(image), a, b))
