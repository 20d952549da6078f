"""The structured truth of an image: its objects and, for relation scenes, the stated relation.

Coordinates are pixels of the rendered image, x to the right and y down; `center` is the centre of
the object's bounding box and `bbox` is (x0, y0, x1, y1) with exclusive upper edges, so the width is
x1 - x0. Both are floats: the renderer places shapes with sub-pixel precision.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

# GenEval's margin (Ghosh et al. 2023, evaluate_images.py): the centre offset must exceed 0.1 of
# the two objects' summed dimensions before any relation counts.
POSITION_THRESHOLD = 0.1
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class Obj:
    color: str                                  # a palette name, e.g. "red"
    shape: str                                  # e.g. "circle"
    size: str                                   # "small" | "large"
    center: tuple[float, float]                 # (x, y), pixels
    bbox: tuple[float, float, float, float]     # (x0, y0, x1, y1), pixels, x1/y1 exclusive

    def to_dict(self) -> dict:
        return {"color": self.color, "shape": self.shape, "size": self.size,
                "center": [round(v, 3) for v in self.center], "bbox": [round(v, 3) for v in self.bbox]}

    @classmethod
    def from_dict(cls, d: dict) -> "Obj":
        return cls(color=d["color"], shape=d["shape"], size=d["size"],
                   center=tuple(float(v) for v in d["center"]), bbox=tuple(float(v) for v in d["bbox"]))


@dataclass(frozen=True)
class Relation:
    """`groups[first]` is `relation` of `groups[second]`: indices into Scene.groups."""
    relation: str
    first: int = 0
    second: int = 1


@dataclass(frozen=True)
class Scene:
    """What was drawn. `kind` says which caption family describes it (single, count, two, relation,
    generic); `groups` are the caption's noun phrases as lists of object indices (for a count scene
    one group of n objects; for a relation scene the two related groups)."""
    objects: tuple[Obj, ...]
    background: str
    kind: str
    size: int                                   # image side, pixels
    groups: tuple[tuple[int, ...], ...] = ()
    relation: Relation | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "size": self.size, "background": self.background,
                "objects": [o.to_dict() for o in self.objects], "groups": [list(g) for g in self.groups],
                "relation": asdict(self.relation) if self.relation else None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        rel = d.get("relation")
        return cls(objects=tuple(Obj.from_dict(o) for o in d["objects"]), background=d["background"],
                   kind=d["kind"], size=int(d["size"]), groups=tuple(tuple(g) for g in d.get("groups", ())),
                   relation=Relation(**rel) if rel else None)

    @classmethod
    def from_json(cls, text: str) -> "Scene":
        return cls.from_dict(json.loads(text))


def relations(bbox_a, bbox_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Where A is relative to B, from their boxes (x0, y0, x1, y1), by GenEval's rule: shrink the
    centre offset by `threshold` x (dim_a + dim_b) per axis; a relation holds when the shrunk
    offset, divided by the length of the full offset, exceeds 0.5 along its axis. Diagonal
    placements can hold two relations; near-coincident centres hold none."""
    a, b = np.asarray(bbox_a, float), np.asarray(bbox_b, float)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def canonical(relation: str, first: str, second: str) -> tuple[str, str, str]:
    """The picture a relation describes, independent of phrasing: ("horizontal", left, right) or
    ("vertical", top, bottom). "a circle left of a square" and "a square right of a circle" are
    the same picture, so a held-out composition is held out in both phrasings."""
    if relation == "left of":
        return ("horizontal", first, second)
    if relation == "right of":
        return ("horizontal", second, first)
    if relation == "above":
        return ("vertical", first, second)
    if relation == "below":
        return ("vertical", second, first)
    raise ValueError(f"unknown relation {relation!r}; expected one of {', '.join(RELATIONS)}")


@dataclass(frozen=True)
class GroupSpec:
    """One noun phrase of a caption: `count` objects of one colour, shape and size."""
    color: str
    shape: str
    size: str = "small"
    count: int = 1
