"""The models folder the server can switch between (A1111's checkpoint list).

Entries are what the folder holds, one level deep: `*.safetensors` files (marble files and SD /
SDXL single files) and diffusers pipeline folders (with `model_index.json`). A client names one by
its name (the file stem or folder name), its file name or A1111's title `name [hash]`; a name is
only ever matched against this listing, never joined to a path, so no request reaches outside the
folder. Hashes are A1111's (first 10 hex of the sha256), computed when a model is loaded, as
A1111 does, and remembered for the listing; the hash cache (marble.checkpoints.file_hashes) makes
that once per file change, across restarts too, and shares the hash the load computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from marble.checkpoints.file_hashes import cached_sha256, file_sha256


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
        """The full sha256 of a single file, if known without reading it (hashed by `remember`, by
        a load, or in an earlier run); None for folders."""
        if not entry.path.is_file():
            return None
        return cached_sha256(entry.path)

    def remember(self, entry: CatalogEntry) -> str | None:
        """The full sha256 of a single file (when it is loaded), hashed now unless it is known."""
        if not entry.path.is_file():
            return None
        return file_sha256(entry.path)
