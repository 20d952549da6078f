"""A contact sheet of benchmark samples: each image enlarged, framed green (pass) or red (fail),
with its verdict, seed and prompt written under it. A tile whose verdict is None is an input
shown beside its result (the control image of `marble eval --control`), framed grey."""
from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

PASS, FAIL, INPUT = (40, 170, 70), (215, 40, 40), (150, 150, 150)
BORDER = 4
TEXT_LINES = 3


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, lines: int) -> list[str]:
    out, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            out.append(line)
            line = word
    out.append(line)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1].rstrip(".") + "..."
    return out


def contact_sheet(tiles: Sequence[tuple[Image.Image, bool | None, str]], columns: int = 8,
                  tile: int = 128) -> Image.Image:
    """tiles: (image, passed, caption); passed None marks an input tile. Images are scaled to `tile`
    pixels (nearest neighbour, so pixels stay visible)."""
    if not tiles:
        raise ValueError("a contact sheet needs at least one image")
    font = ImageFont.load_default()
    line_h = 12
    cell_w, cell_h = tile + 2 * BORDER, tile + 2 * BORDER + line_h * (TEXT_LINES + 1) + 4
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, passed, caption) in enumerate(tiles):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        color = INPUT if passed is None else PASS if passed else FAIL
        draw.rectangle([x, y, x + cell_w - 1, y + tile + 2 * BORDER - 1], fill=color)
        sheet.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (x + BORDER, y + BORDER))
        ty = y + tile + 2 * BORDER + 2
        label = "INPUT" if passed is None else "PASS" if passed else "FAIL"
        draw.text((x + 2, ty), label, fill=color, font=font)
        for k, line in enumerate(_wrap(draw, caption, font, cell_w - 4, TEXT_LINES)):
            draw.text((x + 2, ty + line_h * (k + 1)), line, fill=(0, 0, 0), font=font)
    return sheet
