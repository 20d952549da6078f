"""How well the detector recovers the world's truth, on clean and on degraded renders.

Generated images are imperfect, so the detector is also measured on renders with pixel noise,
blur and a colour shift (each a closure `degrade(image, rng) -> image`). Run as a script to print
the table: `python -m marble.eval.detector_accuracy --n 2000`; `--split concept --shape heart`
measures the concept shape (colour, shape, size and centre of the hearts only; count per image).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from marble.data.scene import Scene
from marble.data.shapes import render, sample_scene
from marble.eval.detector import Detection, detect

Degrade = Callable[[Image.Image, np.random.Generator], Image.Image]
ATTRIBUTES = ("count", "color", "shape", "size", "center")
CENTER_TOLERANCE = 1.5 / 64   # of the image side: 1.5 px at 64x64


def pixel_noise(sigma: float = 8.0) -> Degrade:
    """Gaussian noise of std `sigma` (0-255 units) on every channel of every pixel."""
    def degrade(image, rng):
        arr = np.asarray(image, np.float32) + rng.normal(0.0, sigma, (image.height, image.width, 3))
        return Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8))
    return degrade


def blur(radius: float = 0.8) -> Degrade:
    """Gaussian blur, `radius` (std) in pixels at 64x64, scaled with the image side."""
    return lambda image, rng: image.filter(ImageFilter.GaussianBlur(radius * image.width / 64))


def color_shift(amount: float = 20.0) -> Degrade:
    """The whole image (background included) offset per channel by up to +-`amount` (0-255)."""
    def degrade(image, rng):
        arr = np.asarray(image, np.float32) + rng.uniform(-amount, amount, 3)
        return Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8))
    return degrade


def chain(*steps: Degrade) -> Degrade:
    def degrade(image, rng):
        for step in steps:
            image = step(image, rng)
        return image
    return degrade


DEGRADATIONS: dict[str, Degrade] = {
    "clean": lambda image, rng: image,
    "noise (std 8)": pixel_noise(8.0),
    "blur (std 0.8 px)": blur(0.8),
    "colour shift (+-20)": color_shift(20.0),
    "all three": chain(color_shift(20.0), blur(0.8), pixel_noise(8.0)),
    "all three, strong (+-30, 1.0 px, std 12)": chain(color_shift(30.0), blur(1.0), pixel_noise(12.0)),
}


def score_image(scene: Scene, found: list[Detection], shape: str | None = None) -> dict[str, list[bool]]:
    """Per-attribute verdicts: count once per image; colour, shape, size and centre once per true
    object (with `shape`, only the true objects of that shape), against the detection nearest to
    it (each detection used once; a true object with none left is wrong on every attribute)."""
    tol = CENTER_TOLERANCE * scene.size
    out = {a: [] for a in ATTRIBUTES}
    out["count"].append(len(found) == len(scene.objects))
    free = list(found)
    pairs = sorted(((np.hypot(o.center[0] - d.center[0], o.center[1] - d.center[1]), i, j)
                    for i, o in enumerate(scene.objects) for j, d in enumerate(found)))
    match, used = {}, set()
    for _, i, j in pairs:
        if i not in match and j not in used:
            match[i] = free[j]
            used.add(j)
    for i, obj in enumerate(scene.objects):
        if shape is not None and obj.shape != shape:
            continue
        d = match.get(i)
        out["color"].append(d is not None and d.color == obj.color)
        out["shape"].append(d is not None and d.shape == obj.shape)
        out["size"].append(d is not None and d.size == obj.size)
        out["center"].append(d is not None and abs(d.center[0] - obj.center[0]) <= tol
                             and abs(d.center[1] - obj.center[1]) <= tol)
    return out


def measure(n: int, degrade: Degrade = DEGRADATIONS["clean"], split: str = "train", seed: int = 1234,
            size: int = 64, shape: str | None = None) -> tuple[dict[str, float], list[int]]:
    """Accuracy per attribute over samples 0..n-1 of a split, and the indices of imperfect images.
    `shape`: score colour, shape, size and centre on the true objects of that shape only."""
    totals = {a: [0, 0] for a in ATTRIBUTES}
    bad = []
    for i in range(n):
        scene, _ = sample_scene(split, seed, i, size)
        image = degrade(render(scene), np.random.Generator(np.random.PCG64([seed, 99, i])))
        verdicts = score_image(scene, detect(image), shape)
        for a, v in verdicts.items():
            totals[a][0] += sum(v)
            totals[a][1] += len(v)
        if not all(all(v) for v in verdicts.values()):
            bad.append(i)
    return {a: float(c / t) if t else float("nan") for a, (c, t) in totals.items()}, bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--split", default="train")
    parser.add_argument("--shape", default=None, help="score only the objects of this shape (count: per image)")
    args = parser.parse_args()
    what = f", {args.shape} objects" if args.shape else ""
    print(f"| renders ({args.n}, {args.size}x{args.size}, {args.split}{what}) | "
          + " | ".join(ATTRIBUTES) + " | seconds |")
    print("|---" * (len(ATTRIBUTES) + 2) + "|")
    for name, degrade in DEGRADATIONS.items():
        t = time.perf_counter()
        acc, _ = measure(args.n, degrade, split=args.split, size=args.size, shape=args.shape)
        print(f"| {name} | " + " | ".join(f"{acc[a]:.4f}" for a in ATTRIBUTES) + f" | {time.perf_counter() - t:.1f} |")


if __name__ == "__main__":
    main()
