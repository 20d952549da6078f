"""The models folder the server can switch between (A1111's checkpoint list).

Entries are what the folder holds, one level deep: `*.safetensors` files (marble files and SD /
SDXL single files) and diffusers pipeline folders (with `model_index.json`). A client names one by
its name (the file stem or folder name), its file name or A1111's title `name [hash]`; a name is
only ever matched against this listing, never joined to a path, so no request reaches outside the
folder. Hashes are A1111's (first 10 hex of the sha256), computed when a model is loaded, as
A1111 does, and remembered for the listing.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CatalogEntry:
    name: str            # file stem or folder name: what the server calls the model once loaded
    path: Path           # absolute
    filename: str        # the file or folder name inside the models folder

    def title(self, short_hash: str | None) -> str:
        return f"{self.filename} [{short_hash}]" if short_hash else self.filename


class ModelCatalog:
    def __init__(self, folder: Path | None):
        self.folder = folder.resolve() if folder is not None else None
        self._sha256: dict[tuple[str, int, int], str] = {}   # (path, size, mtime_ns) -> full sha256 hex

    def entries(self) -> list[CatalogEntry]:
        """The folder's models, sorted by name; [] when there is no folder."""
        if self.folder is None or not self.folder.is_dir():
            return []
        out = []
        for path in sorted(self.folder.iterdir()):
            if path.name.startswith("."):
                continue
            if (path.is_file() and path.suffix == ".safetensors") or (path / "model_index.json").is_file():
                out.append(CatalogEntry(path.stem if path.is_file() else path.name, path.resolve(), path.name))
        return out

    def find(self, name: str, hashes: dict[str, str] | None = None) -> CatalogEntry | None:
        """The entry a client's name means: name, file name, or title "filename [hash]" / "name [hash]"."""
        for entry in self.entries():
            short = (hashes or {}).get(entry.name)
            titles = {entry.name, entry.filename}
            if short:
                titles |= {f"{entry.name} [{short}]", entry.title(short)}
            if name in titles:
                return entry
        return None

    def sha256(self, entry: CatalogEntry) -> str | None:
        """The full sha256 of a single file, if known (remembered by `remember`); None for folders."""
        if not entry.path.is_file():
            return None
        return self._sha256.get(self._key(entry.path))

    def remember(self, entry: CatalogEntry) -> str | None:
        """Hash a single file now (when it is loaded) and keep the result for the listing."""
        if not entry.path.is_file():
            return None
        key = self._key(entry.path)
        if key not in self._sha256:
            h = hashlib.sha256()
            with open(entry.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            self._sha256[key] = h.hexdigest()
        return self._sha256[key]

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return str(path), st.st_size, st.st_mtime_ns
