"""An exact detector for the shapes world: objects (colour, shape, size, centre, bbox) from pixels.

Because we own the world, no learned detector is needed:
1. background: the median colour of the image border;
2. foreground: pixels nearer to some palette colour than to the background (an anti-aliased edge
   pixel counts when about half covered, as the object's true outline does);
3. objects: 8-connected components of the foreground; a component whose confident pixels hold two
   colours in force (two touching objects) is split by colour;
4. colour: the majority palette entry over the component's confident pixels (those at least 3/4 as
   far from the background as its most saturated ones), so blended edge pixels do not vote;
5. coverage: each pixel's alpha, its projection on the background -> object-colour line (a global
   colour shift moves both ends and cancels);
6. shape, by analysis by synthesis: the coverage's mass and centroid survive blur, so for each
   shape they fix an extent and a centre; that hypothesis is rendered, blurred by a few amounts
   (generated images are soft), and the best soft IoU with the observed coverage wins. Its
   extent gives the size (small / large) and its box the centre. A concept shape (the heart,
   drawn only by the concept splits) wins only when it beats every base shape by CONCEPT_MARGIN:
   on base-world images the base shapes are fitted exactly as before, so no base verdict moves
   (tests/test_detector.py pins them), and an ambiguous blob stays what it was.
Components that are too small, too large, of mixed colour or like no shape are rejected: that is
what makes random images score ~0.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from marble.data.shapes import ALL_SHAPES, COLORS, CONCEPT_SHAPES, GEOMETRY, SIZE_THRESHOLD, coverage
from marble.eval.components import label

WORK_SIDE = 96            # larger images are reduced to between this and twice this
BLURS = (0.0, 0.6, 1.2)   # blur (std, px at 64x64) applied to the shape hypotheses
MIN_AREA = 0.008          # of the image area: 33 px at 64x64, about half the smallest shape (~60 px)
MIN_EXTENT = 9 / 64       # of the image side: the smallest shape is 12/64
MAX_EXTENT = 0.6          # of the image side: the largest shape is 26/64 = 0.41
MIN_SCORE = 0.75          # soft IoU of the best hypothesis (world objects: >= 0.89 clean, >= 0.81 degraded)
MIN_PURITY = 0.6          # share of confident pixels that have the component's colour
SPLIT_SHARE = 0.25        # a second colour with this share of confident pixels splits a component
# a concept shape must beat the best base shape's soft IoU by this much (measured on world renders,
# strongly degraded: hearts beat the best base shape by >= 0.10, base objects never favour a heart)
CONCEPT_MARGIN = 0.05


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    size: str                                   # "small" | "large"
    center: tuple[float, float]                 # (x, y) of the bbox centre, pixels
    bbox: tuple[float, float, float, float]     # (x0, y0, x1, y1), pixels, x1/y1 exclusive
    score: float                                # soft IoU of the fitted shape, <= 1

    def to_dict(self) -> dict:
        return {"color": self.color, "shape": self.shape, "size": self.size,
                "center": [round(v, 2) for v in self.center], "bbox": [round(v, 2) for v in self.bbox],
                "score": round(self.score, 3)}


@lru_cache(maxsize=None)
def shape_moments() -> dict[str, tuple[float, float, float]]:
    """shape -> (area, centroid x, centroid y) in units of the extent, the centroid relative to the
    bbox centre (the triangle's and the star's lie below it)."""
    n = 64
    ys, xs = np.mgrid[0:n, 0:n] + 0.5
    out = {}
    for shape in ALL_SHAPES:
        a = coverage(shape, (n / 2, n / 2), n, (n, n), supersample=8).astype(np.float64)
        m = a.sum()
        out[shape] = (m / n**2, ((a * xs).sum() / m - n / 2) / n, ((a * ys).sum() / m - n / 2) / n)
    return out


@lru_cache(maxsize=1024)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    i = np.arange(n)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    r = int(np.ceil(6 * sigma)) + 1
    return (k / np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).sum()).astype(np.float32)  # unit mass


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (std `sigma` pixels) with zero padding, as two small matrix products."""
    if sigma <= 0:
        return a
    return _blur_matrix(a.shape[0], sigma) @ a @ _blur_matrix(a.shape[1], sigma).T


def render_alpha(shape: str, center, extent: float, hw: tuple[int, int]) -> np.ndarray:
    """Coverage of a shape hypothesis, drawn exactly as the world draws it."""
    return coverage(shape, center, extent, hw)


def _margin(shape: str, incumbent: str) -> float:
    """What `shape` must add to the incumbent's score to replace it: a concept shape must clearly
    beat a base shape; otherwise the better score wins."""
    return CONCEPT_MARGIN if shape in CONCEPT_SHAPES and incumbent not in CONCEPT_SHAPES else 0.0


def fit_shape(alpha: np.ndarray, side: int) -> tuple[str, float, tuple[float, float], float] | None:
    """(shape, soft IoU, bbox centre, extent) of the best hypothesis for a coverage patch, or None.
    Mass and centroid are invariant to (symmetric) blur, so each shape's extent is
    sqrt(mass / area) and its centre the centroid less the shape's own centroid offset."""
    mass = float(alpha.sum())
    if mass <= 0:
        return None
    ys, xs = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]] + 0.5
    cx, cy = float((alpha * xs).sum() / mass), float((alpha * ys).sum() / mass)
    best = None
    for shape, (area, off_x, off_y) in shape_moments().items():   # base shapes first, then concepts
        extent = (mass / area) ** 0.5
        if not MIN_EXTENT * side <= extent <= MAX_EXTENT * side:
            continue
        if best is not None and best[1] + _margin(shape, best[0]) >= 1.0:
            continue                          # soft IoU is at most 1: this shape cannot win
        center = (cx - off_x * extent, cy - off_y * extent)
        model = render_alpha(shape, center, extent, alpha.shape)
        for blur in BLURS:
            m = gaussian_blur(model, blur * side / 64)
            score = float(np.minimum(alpha, m).sum() / max(np.maximum(alpha, m).sum(), 1e-6))
            if best is None or score > best[1] + _margin(shape, best[0]):
                best = (shape, score, center, extent)
    return best


def background_color(rgb: np.ndarray) -> np.ndarray:
    """Median of the outermost pixels (a border ~1/64 of the side wide)."""
    h, w, _ = rgb.shape
    b = max(1, min(h, w) // 64)
    border = np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                             rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)])
    return np.median(border, axis=0)


def detect(image: Image.Image | np.ndarray, palette: dict[str, tuple[int, int, int]] = COLORS) -> list[Detection]:
    """The world's objects in `image` (any size: the world's geometry is relative to the side),
    sorted top to bottom, then left to right. Images over WORK_SIDE are box-averaged down by an
    integer factor first (the world needs no more detail) and the boxes scaled back."""
    image = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    factor = min(image.size) // WORK_SIDE
    if factor >= 2:
        return [Detection(d.color, d.shape, d.size, (d.center[0] * factor, d.center[1] * factor),
                          tuple(v * factor for v in d.bbox), d.score) for d in _detect(image.reduce(factor), palette)]
    return _detect(image, palette)


def _detect(image: Image.Image, palette: dict[str, tuple[int, int, int]]) -> list[Detection]:
    rgb = np.asarray(image, np.float32)
    h, w, _ = rgb.shape
    side = min(h, w)
    names, colors = list(palette), np.array(list(palette.values()), np.float32)
    bg = background_color(rgb)
    dist = np.linalg.norm(rgb[:, :, None, :] - colors[None, None], axis=-1)     # (H, W, K)
    dist_bg = np.linalg.norm(rgb - bg, axis=-1)
    fg = dist.min(-1) < dist_bg
    labels, n = label(fg)
    min_area = MIN_AREA * h * w
    found = []
    for comp in range(1, n + 1):
        ys, xs = np.nonzero(labels == comp)
        if len(ys) < min_area:
            continue
        for color, sel in colour_parts(dist[ys, xs], dist_bg[ys, xs], min_area):
            part = np.zeros((h, w), bool)
            part[ys[sel], xs[sel]] = True
            sub, m = (part.astype(np.int32), 1) if sel.all() else label(part)
            for k in range(1, m + 1):
                py, px = np.nonzero(sub == k)
                d = _measure(rgb, bg, colors[color], py, px, fg, side, min_area)
                if d is not None:
                    shape, score, box, size = d
                    center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
                    found.append(Detection(names[color], shape, size, center, box, score))
    found.sort(key=lambda d: (round(d.center[1]), d.center[0]))
    return found


def colour_parts(dist: np.ndarray, dist_bg: np.ndarray, min_area: float) -> list[tuple[int, np.ndarray]]:
    """(colour index, selection of the component's pixels) for each colour holding a real part of
    the component; none when no colour is pure enough (noise). dist: (N, K) to the palette."""
    nearest = dist.argmin(-1)
    confident = dist_bg >= 0.75 * np.percentile(dist_bg, 95)
    votes = np.bincount(nearest[confident], minlength=dist.shape[1])
    order = np.argsort(-votes, kind="stable")
    total = votes.sum()
    strong = [int(c) for c in order if votes[c] >= SPLIT_SHARE * total and votes[c] >= min_area / 2]
    if len(strong) <= 1:
        top = int(order[0])
        return [(top, np.ones(len(nearest), bool))] if votes[top] >= MIN_PURITY * total else []
    # touching objects of different colours: each pixel joins the strong colour nearest to it
    owner = np.asarray(strong)[dist[:, strong].argmin(-1)]
    return [(c, owner == c) for c in strong]


def _measure(rgb, bg, color, ys, xs, fg, side, min_area):
    """(shape, score, box, size) of the object whose pixels are (ys, xs); None if it is no shape."""
    if len(ys) < min_area or max(xs.max() - xs.min(), ys.max() - ys.min()) > MAX_EXTENT * side:
        return None
    pad = max(2, round(2 * side / 64))         # room for a blurred fringe
    h, w = fg.shape
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + 1 + pad, h)
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + 1 + pad, w)
    patch = rgb[y0:y1, x0:x1]
    axis = color - bg
    alpha = np.clip(((patch - bg) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0)
    # the object's own pixels and the background around them; other objects' pixels are 0
    own = np.zeros(patch.shape[:2], bool)
    own[ys - y0, xs - x0] = True
    alpha = np.where(own | ~fg[y0:y1, x0:x1], alpha, 0.0).astype(np.float32)
    if (alpha >= 0.5).sum() < min_area:
        return None
    fit = fit_shape(alpha, side)
    if fit is None or fit[1] < MIN_SCORE:
        return None
    shape, score, (cx, cy), extent = fit
    _, (sw, sh) = GEOMETRY[shape]
    cx, cy = cx + x0, cy + y0
    box = (cx - sw * extent / 2, cy - sh * extent / 2, cx + sw * extent / 2, cy + sh * extent / 2)
    size = "large" if extent >= SIZE_THRESHOLD * side else "small"
    return shape, score, box, size
