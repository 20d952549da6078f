"""The shapes world: a procedural, captioned world whose ground truth we own.

Coloured shapes on light backgrounds, anti-aliased (each pixel's coverage is the share of a 4x4
grid of points in it that fall inside the shape). Sample
`index` of a split is a pure function of (seed, split, index) through its own PCG64 generator, so
a data set can be streamed, sharded or re-rendered at another size and stays the same world.

Vocabulary: 8 colours x 6 shapes x 2 sizes, counts 1-4, relations left of / right of / above /
below between two groups, 5 backgrounds. Scene kinds: single, count (2-4 alike), two (two
different shapes), relation (two groups, each of 1 or 2 objects, every cross pair holding the
relation by GenEval's rule). About 5% of captions are generic ("a shape", "some objects").

Held out of the training split (docs/eval.md):
- HELDOUT_PAIRS: (colour, shape) pairs that no training image contains;
- HELDOUT_RELATIONS: pictures of one shape left of / above another, in either phrasing
  ("a circle left of a square" = "a square right of a circle"), that no training image contains,
  captioned or not: placements of two different shapes that would hold one are rejected.
The "heldout" split contains, in every image, at least one held-out composition.

Concept splits (marble/data/concept.py): a shape the base world never draws, the heart
(CONCEPT_SHAPES), for teaching a trained model something new. It is in GEOMETRY, so it renders
like the others, but not in SHAPES: the base splits' vocabulary and draws do not know it. The
"concept" split shows it in training-like scenes, "concept-new" only in combinations "concept"
holds back.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from marble.data.concept import concept_content
from marble.data.scene import GroupSpec, Obj, Relation, Scene, canonical, relations

# Well-separated (nearest pair: orange/yellow, 96 RGB units apart; every colour >= 112 from every
# background) so that colour is recoverable by nearest palette entry even after a colour shift.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 125, 10),
    "yellow": (250, 220, 20),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 170),
    "pink": (245, 110, 190),
    "black": (25, 25, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (215, 215, 215),
    "cream": (250, 240, 215),
    "pale blue": (210, 228, 250),
    "pale green": (220, 242, 220),
}
BACKGROUND_WEIGHTS = (0.4, 0.15, 0.15, 0.15, 0.15)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
CONCEPT_SHAPES: tuple[str, ...] = ("heart",)      # drawn only in the concept splits
ALL_SHAPES: tuple[str, ...] = SHAPES + CONCEPT_SHAPES
# extent (the larger of width and height) as a fraction of the image side: 12-16 and 22-26 px at 64
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (12 / 64, 16 / 64), "large": (22 / 64, 26 / 64)}
SIZE_THRESHOLD = 19 / 64       # the detector's small/large boundary, midway between the ranges
MARGIN = 2 / 64                # objects keep this far from the image edge ...
GAP = 3 / 64                   # ... and at least this far from each other along x or y
SUPERSAMPLE = 4

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("red", "star"), ("orange", "square"), ("yellow", "circle"), ("green", "triangle"),
    ("blue", "diamond"), ("purple", "cross"), ("pink", "circle"), ("black", "square")})
# ("horizontal", left shape, right shape) or ("vertical", top shape, bottom shape)
HELDOUT_RELATIONS: frozenset[tuple[str, str, str]] = frozenset({
    ("horizontal", "circle", "square"), ("horizontal", "triangle", "star"),
    ("horizontal", "diamond", "cross"), ("horizontal", "square", "triangle"),
    ("vertical", "star", "circle"), ("vertical", "cross", "triangle"),
    ("vertical", "square", "diamond"), ("vertical", "circle", "cross")})
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple(itertools.product(COLORS, SHAPES))
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)
SEEN_RELATIONS: tuple[tuple[str, str, str], ...] = tuple(
    (axis, a, b) for axis in ("horizontal", "vertical") for a in SHAPES for b in SHAPES
    if a != b and (axis, a, b) not in HELDOUT_RELATIONS)

BASE_SPLITS = ("train", "heldout")
CONCEPT_SPLITS = ("concept", "concept-new")
SPLITS = BASE_SPLITS + CONCEPT_SPLITS
_SPLIT_CODE = {"train": 0, "heldout": 1, "concept": 2, "concept-new": 3}
KINDS = ("single", "count", "two", "relation")
KIND_WEIGHTS = (0.2, 0.25, 0.2, 0.35)


def _unit_polygon(points) -> tuple[np.ndarray, tuple[float, float]]:
    """Centre the polygon's bounding box on 0 and scale its larger side to 1."""
    p = np.asarray(points, float)
    lo, hi = p.min(0), p.max(0)
    p = (p - (lo + hi) / 2) / (hi - lo).max()
    w, h = (hi - lo) / (hi - lo).max()
    return p, (float(w), float(h))


def _star(inner: float = 0.5) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles)))


def _cross(t: float = 0.38) -> list[tuple[float, float]]:
    a = t / 2
    return [(-a, -.5), (a, -.5), (a, -a), (.5, -a), (.5, a), (a, a), (a, .5), (-a, .5), (-a, a), (-.5, a),
            (-.5, -a), (-a, -a)]


def _heart(n: int = 32) -> list[tuple[float, float]]:
    """The classic heart curve (x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t),
    point down: the notch on top and the point below tell it from every base shape (its own
    hypothesis beats the best base one by >= 0.2 soft IoU on clean renders, >= 0.1 on strongly
    degraded ones); a hexagon would not (within 0.002 of the circle when degraded)."""
    t = np.arange(n) * 2 * np.pi / n
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))   # image y is down
    return list(zip(x, y))


# shape -> (outline in units of the extent, bbox centred on 0, or None for the circle; (w, h))
GEOMETRY: dict[str, tuple[np.ndarray | None, tuple[float, float]]] = {
    "circle": (None, (1.0, 1.0)),
    "square": _unit_polygon([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": _unit_polygon([(0, -np.sqrt(3) / 2), (0.5, 0), (-0.5, 0)]),   # equilateral, apex up
    "diamond": _unit_polygon([(0, -1), (1, 0), (0, 1), (-1, 0)]),
    "star": _unit_polygon(_star()),                                           # five points, apex up
    "cross": _unit_polygon(_cross()),
    "heart": _unit_polygon(_heart()),                                         # concept splits only
}


def coverage(shape: str, center, extent: float, hw: tuple[int, int], supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], (h, w) float32, of `shape` with bbox centre `center` and
    larger side `extent` (pixels; pixel i spans [i, i+1)): the fraction of a supersample x
    supersample grid of points in each pixel that lie inside (even-odd rule for polygons)."""
    h, w = hw
    out = np.zeros((h, w), np.float32)
    outline, (sw, sh) = GEOMETRY[shape]
    x0, x1 = max(int(np.floor(center[0] - sw * extent / 2)), 0), min(int(np.ceil(center[0] + sw * extent / 2)), w)
    y0, y1 = max(int(np.floor(center[1] - sh * extent / 2)), 0), min(int(np.ceil(center[1] + sh * extent / 2)), h)
    if x1 <= x0 or y1 <= y0:
        return out
    offsets = (np.arange(supersample) + 0.5) / supersample
    px = (np.arange(x0, x1)[:, None] + offsets).reshape(-1) - center[0]
    py = (np.arange(y0, y1)[:, None] + offsets).reshape(-1)[:, None] - center[1]
    if outline is None:
        inside = px**2 + py**2 <= (extent / 2) ** 2
    else:
        inside = np.zeros((len(py), len(px)), bool)
        vx, vy = outline[:, 0] * extent, outline[:, 1] * extent
        for ax, ay, bx, by in zip(vx, vy, np.roll(vx, -1), np.roll(vy, -1)):
            if ay == by:
                continue                      # horizontal edges cross no ray
            crosses = (ay > py) != (by > py)
            x_at = ax + (py - ay) * (bx - ax) / (by - ay)
            inside ^= crosses & (px < x_at)
    cells = inside.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))
    out[y0:y1, x0:x1] = cells
    return out


def render(scene: Scene, supersample: int = SUPERSAMPLE) -> Image.Image:
    """The scene as an RGB image: each object's coverage blends its colour over the background."""
    n = scene.size
    arr = np.empty((n, n, 3), np.float32)
    arr[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        extent = max(obj.bbox[2] - obj.bbox[0], obj.bbox[3] - obj.bbox[1])
        alpha = coverage(obj.shape, obj.center, extent, (n, n), supersample)[:, :, None]
        arr = arr * (1 - alpha) + np.asarray(COLORS[obj.color], np.float32) * alpha
    return Image.fromarray(np.round(arr).astype(np.uint8))


def _box(shape: str, center, extent: float) -> tuple[float, float, float, float]:
    _, (w, h) = GEOMETRY[shape]
    return (center[0] - w * extent / 2, center[1] - h * extent / 2, center[0] + w * extent / 2, center[1] + h * extent / 2)


def _apart(a, b, gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def forbidden_relation(objects, forbidden: frozenset) -> bool:
    """Whether two objects of different shapes hold a relation whose picture is in `forbidden`."""
    for a, b in itertools.permutations(objects, 2):
        if a.shape != b.shape and any(canonical(r, a.shape, b.shape) in forbidden for r in relations(a.bbox, b.bbox)):
            return True
    return False


def compose(rng: np.random.Generator, groups: list[GroupSpec], size: int, background: str, *,
            relation: str | None = None, forbidden: frozenset = frozenset(), kind: str | None = None,
            tries: int = 300) -> Scene | None:
    """Place the groups' objects without overlap; with `relation`, every object of group 0 holds
    exactly that relation (and no other) to every object of group 1. Placements in which two
    different shapes picture a `forbidden` relation are rejected. None when no placement is found."""
    extents = [rng.uniform(*SIZE_RANGES[g.size]) * size for g in groups]
    margin, gap = MARGIN * size, GAP * size
    for _ in range(tries):
        objects, owner = [], []
        for gi, (g, e) in enumerate(zip(groups, extents)):
            _, (w, h) = GEOMETRY[g.shape]
            for _ in range(g.count):
                lo = np.array([margin + w * e / 2, margin + h * e / 2])
                hi = size - lo
                if relation is not None:
                    # bias the first group to its side of the image and the second to the other
                    axis = 0 if relation in ("left of", "right of") else 1
                    first_low = relation in ("left of", "above")
                    if (gi == 0) == first_low:
                        hi[axis] = min(hi[axis], size / 2)
                    else:
                        lo[axis] = max(lo[axis], size / 2)
                if np.any(lo > hi):
                    return None
                c = rng.uniform(lo, hi)
                center = (round(float(c[0]), 3), round(float(c[1]), 3))   # as stored in JSON
                box = tuple(round(v, 3) for v in _box(g.shape, center, e))
                objects.append(Obj(g.color, g.shape, g.size, center, box))
                owner.append(gi)
        if not all(_apart(a.bbox, b.bbox, gap) for a, b in itertools.combinations(objects, 2)):
            continue
        if relation is not None and not all(
                relations(objects[i].bbox, objects[j].bbox) == {relation}
                for i in range(len(objects)) for j in range(len(objects)) if owner[i] == 0 and owner[j] == 1):
            continue
        if forbidden and forbidden_relation(objects, forbidden):
            continue
        index_groups = tuple(tuple(i for i, o in enumerate(owner) if o == gi) for gi in range(len(groups)))
        kind = kind or ("relation" if relation else "two" if len(groups) == 2 else
                        "count" if groups[0].count > 1 else "single")
        return Scene(tuple(objects), background, kind, size, index_groups,
                     Relation(relation) if relation else None)
    return None


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _content(rng: np.random.Generator, kind: str, split: str) -> tuple[list[GroupSpec], str | None]:
    """Which groups (and relation) a scene of `kind` shows; train avoids, heldout features, the
    held-out compositions."""
    pairs = SEEN_PAIRS if split == "train" else tuple(HELDOUT_PAIRS)
    pairs = tuple(sorted(pairs))
    size = lambda: _pick(rng, ("small", "large"))  # noqa: E731
    if kind == "single":
        c, s = _pick(rng, pairs)
        return [GroupSpec(c, s, size(), 1)], None
    if kind == "count":
        n = int(rng.integers(2, 5))
        c, s = _pick(rng, pairs)
        return [GroupSpec(c, s, size() if n == 2 else "small", n)], None   # 3-4 large ones do not fit
    if kind == "two":
        first = _pick(rng, pairs)
        second = _pick(rng, tuple(p for p in (SEEN_PAIRS if split == "train" else ALL_PAIRS) if p[1] != first[1]))
        if rng.random() < 0.5:
            first, second = second, first
        return [GroupSpec(*first, size()), GroupSpec(*second, size())], None
    # relation: in train any seen picture, in heldout a held-out one; either phrasing
    configs = SEEN_RELATIONS if split == "train" else tuple(sorted(HELDOUT_RELATIONS))
    axis, a, b = _pick(rng, configs)
    relation, first, second = _pick(rng, ((("left of", a, b), ("right of", b, a)) if axis == "horizontal"
                                          else (("above", a, b), ("below", b, a))))
    color_pairs = SEEN_PAIRS if split == "train" else ALL_PAIRS
    counts = [2 if rng.random() < 0.2 else 1, 2 if rng.random() < 0.2 else 1]
    sizes = ["small" if n == 2 else size() for n in counts]
    groups = []
    for shape, n, sz in zip((first, second), counts, sizes):
        c = _pick(rng, tuple(p[0] for p in color_pairs if p[1] == shape))
        groups.append(GroupSpec(c, shape, sz, n))
    return groups, relation


def split_rng(split: str, seed: int, index: int) -> np.random.Generator:
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return np.random.Generator(np.random.PCG64([int(seed), _SPLIT_CODE[split], int(index)]))


def kind_probabilities(weights: dict[str, float] | None) -> tuple[float, ...]:
    """The scene-kind mix as probabilities in KINDS order: {"relation": 1} draws only relation
    scenes; None is the world's own mix, KIND_WEIGHTS."""
    if weights is None:
        return KIND_WEIGHTS
    unknown = set(weights) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown scene kinds {', '.join(sorted(unknown))}; expected {', '.join(KINDS)}")
    w = [float(weights.get(k, 0.0)) for k in KINDS]
    if min(w) < 0 or sum(w) <= 0:
        raise ValueError("scene-kind weights must be >= 0 and not all 0")
    total = sum(w)
    return tuple(x / total for x in w)


def sample_scene(split: str, seed: int, index: int, size: int = 64,
                 kinds: tuple[float, ...] = KIND_WEIGHTS) -> tuple[Scene, str]:
    """Sample `index` of `split`: its scene and caption, a pure function of the arguments.
    `kinds`: the probability of each scene kind, in KINDS order (kind_probabilities)."""
    from marble.data.captions import caption
    rng = split_rng(split, seed, index)
    forbidden = HELDOUT_RELATIONS if split == "train" else frozenset()
    content = _content if split not in CONCEPT_SPLITS else (
        lambda rng, kind, split: concept_content(rng, kind, split, SEEN_PAIRS))
    while True:
        kind = KINDS[int(rng.choice(len(KINDS), p=kinds))]
        groups, relation = content(rng, kind, split)
        background = list(BACKGROUNDS)[int(rng.choice(len(BACKGROUNDS), p=BACKGROUND_WEIGHTS))]
        scene = compose(rng, groups, size, background, relation=relation, forbidden=forbidden, kind=kind)
        if scene is not None:
            return scene, caption(scene, rng)


def sample(split: str, seed: int, index: int, size: int = 64,
           kinds: tuple[float, ...] = KIND_WEIGHTS) -> tuple[Image.Image, str, Scene]:
    scene, text = sample_scene(split, seed, index, size, kinds)
    return render(scene), text, scene


def render_dataset(n: int, split: str = "train", seed: int = 0, size: int = 64, start: int = 0,
                   kinds: tuple[float, ...] = KIND_WEIGHTS) -> tuple[np.ndarray, list[str]]:
    """Samples start .. start+n-1 of a split: images (n, size, size, 3) uint8 and their captions."""
    images = np.empty((n, size, size, 3), np.uint8)
    captions = []
    for i in range(n):
        image, text, _ = sample(split, seed, start + i, size, kinds)
        images[i] = np.asarray(image)
        captions.append(text)
    return images, captions


class ShapesDataset:
    """The world as a map-style data set: item i -> (PIL image, caption, record), the same triple
    as ImageFolder, with the structured truth in record["scene"]."""

    def __init__(self, n: int, split: str = "train", seed: int = 0, size: int = 64):
        split_rng(split, seed, 0)   # validates the split
        if n < 0 or size < 16:
            raise ValueError("n must be >= 0 and size >= 16")
        self.n, self.split, self.seed, self.size = n, split, seed, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Image.Image, str, dict]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        image, text, scene = sample(self.split, self.seed, i, self.size)
        record = {"text": text, "world": "shapes", "split": self.split, "seed": self.seed, "index": i,
                  "scene": scene.to_dict()}
        return image, text, record
