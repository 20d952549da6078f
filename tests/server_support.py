"""Helpers shared by the tests/test_server_*.py files."""
from __future__ import annotations

import base64
import io
import threading

import numpy as np
from PIL import Image

from marble.pipeline import Pipeline
from marble.request import ResolvedRequest


class GatedPipeline:
    """The real pipeline, held before step `at` until the test opens the gate: makes "a job is
    running right now" a state a test can rely on instead of a race against a fast model."""

    def __init__(self, pipe: Pipeline, at: int = 0):
        self.pipe, self.at = pipe, at
        self.gate = threading.Event()
        self.reached = threading.Event()
        self.calls = 0
        self.steps: list[int] = []        # every step the sampler reached, across calls

    def __getattr__(self, name):          # name, model, loaded, defaults: the real pipeline's
        return getattr(self.pipe, name)

    def generate(self, request: ResolvedRequest, callback=None):
        self.calls += 1

        def held(step, total, x0):
            self.steps.append(step)
            if step == self.at:
                self.reached.set()
                assert self.gate.wait(30), "the test never opened the gate"
            if callback is not None:
                callback(step, total, x0)
        return self.pipe.generate(request, held)


def renamed(pipe: Pipeline, name: str, model_hash: str) -> Pipeline:
    """The same weights under another name: a second "model" for routing tests."""
    from marble.checkpoints.resolve import LoadedModel
    return Pipeline(LoadedModel(pipe.loaded.model, name, model_hash))


def png_array(data: bytes | str) -> np.ndarray:
    """Pixels of a PNG given as bytes or base64 text."""
    if isinstance(data, str):
        data = base64.b64decode(data)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def png_text(data: bytes | str) -> dict[str, str]:
    if isinstance(data, str):
        data = base64.b64decode(data)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return {k: v for k, v in im.info.items() if isinstance(v, str)}


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def noise_image(size: int, seed: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)
    return Image.fromarray(arr, mode)
