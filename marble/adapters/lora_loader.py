"""From what a request names (prompt tags, --lora paths) to LoRAs ready to apply to one model.

A tag's NAME is looked up in the LoRA folder only (lora_folder.resolve_lora: a server takes prompts
from anyone); a path is what the CLI's user typed. Files are read once per model and kept while
unchanged (keyed by real path, size and mtime), so a server switching LoRAs between requests
reads each file once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch import nn

from marble.adapters.file_cache import FileCache
from marble.adapters.lora import LoraUse
from marble.adapters.lora_files import Lora, read_lora
from marble.errors import LoraError
from marble.adapters.lora_folder import default_lora_dir, resolve_lora
from marble.adapters.lora_table import ModuleTable, module_table


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA a request asks for."""
    ref: str                 # a name in the LoRA folder (from a tag), or a file path (from --lora)
    te: float = 1.0
    unet: float = 1.0
    is_path: bool = False    # True: `ref` is a path the local user gave, not confined to the folder


class LoraLoader:
    """Reads and caches the LoRA files requests name, for one model."""

    def __init__(self, model: nn.Module, folder: Path | None = None, lenient: bool = False, keep: int = 8):
        self.table: ModuleTable = module_table(model)
        self.folder = Path(folder) if folder is not None else default_lora_dir()
        self.lenient = lenient
        self._cache: FileCache[Lora] = FileCache(keep)   # files kept in memory, least recently used dropped first

    def path_of(self, spec: LoraSpec) -> Path:
        if spec.is_path:
            path = Path(spec.ref).expanduser()
            if not path.is_file():
                raise LoraError(f"LoRA {spec.ref}: no such file")
            return path.resolve()
        return resolve_lora(spec.ref, self.folder)

    def read(self, spec: LoraSpec) -> Lora:
        path = self.path_of(spec)
        name = Path(spec.ref).stem if spec.is_path else spec.ref.removesuffix(".safetensors")
        return self._cache.get(path, lambda: read_lora(path, self.table, lenient=self.lenient, name=name),
                               self.lenient)

    def uses(self, specs: Sequence[LoraSpec]) -> list[LoraUse]:
        """Every spec read (LoraError on the first that fails, before anything is applied)."""
        return [LoraUse(self.read(spec), spec.te, spec.unet) for spec in specs]


def record_entries(uses: Sequence[LoraUse], specs: Sequence[LoraSpec]) -> list[dict]:
    """What the generation record keeps of each applied LoRA (record.lora_hashes writes A1111's text)."""
    return [{"name": use.lora.name, "hash": use.lora.hash, "te": use.te, "unet": use.unet,
             **({"path": spec.ref} if spec.is_path else {})} for use, spec in zip(uses, specs)]

