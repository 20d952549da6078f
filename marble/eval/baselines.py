"""Image sources that bracket the benchmark: the world's own truth (must score ~1) and random
pixels (must score ~0). Together they show that the benchmark discriminates. Both are
`generate(prompt, seed) -> PIL image` callables, like a model's."""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
from PIL import Image

from marble.eval.benchmark import Generate
from marble.eval.prompts import Prompt, render_truth


def groundtruth(prompts: Sequence[Prompt], size: int = 64) -> Generate:
    """Renders each prompt's requirement with the world; knows only the prompts it is given."""
    table = {p.text: p.requirement for p in prompts}

    def generate(prompt: str, seed: int) -> Image.Image:
        if prompt not in table:
            raise KeyError(f"the groundtruth source has no requirement for {prompt!r}")
        return render_truth(table[prompt], seed, size)
    return generate


def noise(size: int = 64) -> Generate:
    """Uniform random RGB pixels, seeded by (seed, prompt)."""
    def generate(prompt: str, seed: int) -> Image.Image:
        rng = np.random.Generator(np.random.PCG64([int(seed), zlib.crc32(prompt.encode())]))
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return generate
