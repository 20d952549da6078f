"""The sketch of a scene: the control image the built-in ControlNet is trained on.

Each object is a flat silhouette in its palette colour (marble.data.shapes.COLORS, exactly), hard
edged (a pixel is filled when its centre is inside the shape), on a plain white background
(255, 255, 255), whatever the scene's own background. Silhouettes rather than outlines: one
drawable picture then carries where each object is, its shape, how many there are and which
colour each has; an outline sketch would leave colour to the caption, and counting and colour
attribution are exactly what the caption alone fails at. The world has 8 colours, so a user draws
it with a few brush colours on a sketch pad (the web UI's pad uses the same palette on white).

`sketch_indices` is the same picture as palette indices (0 = background, i + 1 = COLORS' i-th
colour): what the trainer caches, 1 byte a pixel.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from marble.data.scene import Scene
from marble.data.shapes import COLORS, coverage

BACKGROUND = (255, 255, 255)
PALETTE = np.array([BACKGROUND, *COLORS.values()], np.uint8)     # index -> RGB
COLOR_INDEX = {name: i + 1 for i, name in enumerate(COLORS)}


def sketch_indices(scene: Scene, size: int | None = None) -> np.ndarray:
    """(size, size) uint8 palette indices of the scene's silhouettes; `size` defaults to the
    scene's own side (the scene is scaled to it)."""
    n = size or scene.size
    k = n / scene.size
    out = np.zeros((n, n), np.uint8)
    for obj in scene.objects:
        extent = max(obj.bbox[2] - obj.bbox[0], obj.bbox[3] - obj.bbox[1]) * k
        center = (obj.center[0] * k, obj.center[1] * k)
        inside = coverage(obj.shape, center, extent, (n, n), supersample=1) > 0.5   # one point per pixel: no blending
        out[inside] = COLOR_INDEX[obj.color]
    return out


def sketch(scene: Scene, size: int | None = None) -> Image.Image:
    """The scene as flat-coloured silhouettes on white, an RGB image of side `size`."""
    return Image.fromarray(PALETTE[sketch_indices(scene, size)])
