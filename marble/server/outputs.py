"""The outputs folder: every generated image, saved with its record, listed newest first.

Files are written by marble.png.save_numbered (atomic, numbered, never overwritten); since a
file never changes once written, what is read back from it is cached by name.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image

from marble.png import read_text_chunks, save_numbered
from marble.record import GenerationRecord

STEM = "marble"
_NAME = re.compile(rf"^{STEM}-(\d+)\.png$")


@dataclass(frozen=True)
class OutputEntry:
    name: str                   # file name inside the outputs folder
    created: float              # mtime, seconds since the epoch
    parameters: str             # A1111 infotext ("" if the file has none)
    record: dict | None         # marble's JSON record, if present

    def to_json(self, url_prefix: str = "/outputs/") -> dict:
        return {"name": self.name, "url": url_prefix + self.name, "created": self.created,
                "parameters": self.parameters, "record": self.record}


@lru_cache(maxsize=2048)
def _read_entry(path: Path, mtime: float) -> OutputEntry:
    try:
        chunks = read_text_chunks(path)
    except ValueError:
        chunks = {}
    record = None
    if "marble" in chunks:
        try:
            record = json.loads(chunks["marble"])
        except ValueError:
            record = None
    return OutputEntry(path.name, mtime, chunks.get("parameters", ""), record)


class OutputStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def save(self, image: Image.Image, record: GenerationRecord) -> Path:
        return save_numbered(image, record, self.folder, stem=STEM)

    def path(self, name: str) -> Path | None:
        """The file for a name taken from a URL; None unless it is one of ours (no traversal)."""
        if not _NAME.match(name):
            return None
        path = self.folder / name
        return path if path.is_file() else None

    def names(self) -> list[str]:
        """Our files, newest (highest number) first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p.name) for p in self.folder.iterdir() if (m := _NAME.match(p.name))]
        return [name for _, name in sorted(found, reverse=True)]

    def list(self, offset: int = 0, limit: int = 50) -> tuple[int, list[OutputEntry]]:
        """(total, one page of entries, newest first)."""
        names = self.names()
        entries = []
        for name in names[offset:offset + limit]:
            path = self.folder / name
            try:
                entries.append(_read_entry(path, path.stat().st_mtime))
            except FileNotFoundError:   # removed by hand between listing and reading
                continue
        return len(names), entries
