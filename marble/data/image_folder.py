"""Image-folder data sets in the common layout: image files plus metadata.jsonl.

Each line of metadata.jsonl is a JSON object with `file_name` (relative to the folder) and
`text` (the caption; absent means ""); any other fields, such as the shapes world's structured
truth, are kept and handed back as the record. This is the
layout Hugging Face's `imagefolder` loader reads, so a user's own captioned photos work as they
are, and `marble dataset export` writes the same layout.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterable

from PIL import Image, UnidentifiedImageError

METADATA = "metadata.jsonl"


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square, resized to size x size with Lanczos."""
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    square = image.crop((left, top, left + s, top + s))
    return square if s == size else square.resize((size, size), Image.LANCZOS)


class ImageFolder:
    """A captioned image folder. Item i -> (RGB PIL image, caption, record), the record being the
    metadata line with all its fields. `size`: centre-crop and resize every image to size x size.
    Errors (missing folder or metadata, a bad line, a missing image) are ValueError /
    FileNotFoundError with one clear line, raised when the folder is opened."""

    def __init__(self, root: str | Path, size: int | None = None):
        self.root = Path(root)
        self.size = size
        if not self.root.is_dir():
            raise FileNotFoundError(f"no image folder at {self.root}")
        meta = self.root / METADATA
        try:
            lines = meta.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.root} has no {METADATA} (one JSON object per line with "
                                    f"file_name and text)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {meta}: {e}") from None
        self.records: list[dict] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            self.records.append(self._parse(meta, number, line))
        if not self.records:
            raise ValueError(f"{meta} lists no images")

    def _parse(self, meta: Path, number: int, line: str) -> dict:
        where = f"{meta}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object")
        name, text = record.get("file_name"), record.get("text", "")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: needs a file_name (a string)")
        if not isinstance(text, str):
            raise ValueError(f"{where}: text must be a string (the caption)")
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"{where}: file_name {name!r} must stay inside the folder")
        if not (self.root / rel).is_file():
            raise FileNotFoundError(f"{where}: no image file {self.root / rel}")
        return record

    def __len__(self) -> int:
        return len(self.records)

    def path(self, i: int) -> Path:
        return self.root / self.records[i]["file_name"]

    def __getitem__(self, i: int) -> tuple[Image.Image, str, dict]:
        record = self.records[i]
        path = self.path(i)
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise ValueError(f"{path} is not a readable image") from None
        if self.size is not None:
            image = center_crop_resize(image, self.size)
        return image, record.get("text", ""), dict(record)

    def pixels(self, i: int):
        """Item i as a float tensor (3, H, W) in [-1, 1], with its caption and record."""
        import numpy as np
        import torch
        image, text, record = self[i]
        arr = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
        return arr, text, record


def write_image_folder(out: str | Path, items: Iterable[tuple[Image.Image, str, dict]], digits: int = 5) -> int:
    """Write items (image, caption, extra fields) as out/NNNNN.png + out/metadata.jsonl.

    All or nothing: everything is written into a hidden temporary folder beside `out`, which is
    renamed to `out` at the end. `out` must not exist (an empty folder is allowed). Returns the
    number of images written."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        n = 0
        with open(tmp / METADATA, "w", encoding="utf-8") as meta:
            for n, (image, text, extra) in enumerate(items, 1):
                name = f"{n - 1:0{digits}d}.png"
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                (tmp / name).write_bytes(buf.getvalue())
                record = {"file_name": name, "text": text}
                record.update({k: v for k, v in extra.items() if k not in record})
                meta.write(json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n")
            meta.flush()
            os.fsync(meta.fileno())
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()               # empty: checked above
        os.rename(tmp, out)
        return n
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
