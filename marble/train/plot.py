"""A loss curve as a PNG, drawn with Pillow (no plotting library at run time)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from marble.fileio import write_replace


def plot_losses(log_path: Path, out_path: Path, width: int = 640, height: int = 360) -> None:
    """Loss (log scale) against step from the JSONL log, with its running mean."""
    if not Path(log_path).exists():
        return
    points = []
    for line in Path(log_path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("loss", 0) > 0:
                points.append((r["step"], math.log10(r["loss"])))
    if len(points) < 2:
        return
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    pad = 40
    s0, s1 = points[0][0], points[-1][0]
    lo, hi = min(p[1] for p in points), max(p[1] for p in points)
    hi = hi if hi > lo else lo + 1

    def xy(step, value):
        return (pad + (width - 2 * pad) * (step - s0) / max(1, s1 - s0),
                height - pad - (height - 2 * pad) * (value - lo) / (hi - lo))

    draw.rectangle([pad, pad, width - pad, height - pad], outline="gray")
    draw.line([xy(*p) for p in points], fill=(150, 170, 220), width=1)
    k = max(1, len(points) // 50)
    smooth = [(points[i][0], sum(p[1] for p in points[max(0, i - k):i + 1]) / len(points[max(0, i - k):i + 1]))
              for i in range(len(points))]
    draw.line([xy(*p) for p in smooth], fill=(20, 40, 160), width=2)
    draw.text((pad, 10), f"loss (log10), steps {s0}-{s1}: {10**hi:.3g} .. {10**lo:.3g}", fill="black")
    write_replace(out_path, lambda f: img.save(f, format="PNG"))
