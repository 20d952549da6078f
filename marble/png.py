"""PNG files with their generation record, written atomically and never overwritten."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, PngImagePlugin

from marble.fileio import write_new
from marble.record import GenerationRecord


def png_bytes(image: Image.Image, record: GenerationRecord | None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if record is not None:
        info.add_itxt("parameters", record.to_parameters())
        info.add_itxt("marble", record.to_json())
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Never a half-written file, and an existing file is never replaced (FileExistsError)."""
    write_new(path, data)


def save_numbered(image: Image.Image, record: GenerationRecord | None, out_dir: Path, stem: str = "marble") -> Path:
    """Save as out_dir/{stem}-{NNNNN}.png with the first free number; concurrent writers never collide."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = png_bytes(image, record)
    existing = [p.stem.rsplit("-", 1)[-1] for p in out_dir.glob(f"{stem}-*.png")]
    number = max((int(s) for s in existing if s.isdigit()), default=-1) + 1
    while True:
        path = out_dir / f"{stem}-{number:05d}.png"
        try:
            write_atomic(path, data)
            return path
        except FileExistsError:
            number += 1


def read_text_chunks(path: Path) -> dict[str, str]:
    """The PNG's text chunks; ValueError for anything that is not a readable PNG."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise ValueError(f"{path} is not a PNG file")
            im.load()
            return {k: v for k, v in im.info.items() if isinstance(v, str)}
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read {path} as an image: {e}") from None


def read_record(path: Path) -> GenerationRecord:
    """The PNG's marble record, or one read from A1111's `parameters` text when it has only that."""
    chunks = read_text_chunks(path)
    if "marble" not in chunks and "parameters" in chunks:
        try:
            return GenerationRecord.from_parameters(chunks["parameters"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if "marble" not in chunks:
        raise ValueError(f"{path} carries no marble record")
    try:
        return GenerationRecord.from_json(chunks["marble"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: the marble record is malformed ({e})") from None
