"""A checkpoint in memory, whatever file it came from: a marble config plus the state dict under
marble's names (`unet.*`, `vae.*`, `text_encoder.*`), in the dtypes it was stored in.

Every reader (marble file, diffusers folder, SD single file) ends here and every writer starts
here, so `marble convert` is read + write with no model built, and loading is read + `build_model`.
Readers translate keys with a function `to_marble(name, tensor) -> [(key, tensor), ...]` (empty:
a known key that is not needed; None: unknown). It runs first on meta tensors built from the
file's header, so missing, unexpected and misshapen keys are reported before any data is read.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch

from marble.checkpoints.errors import ModelLoadError
from marble.checkpoints.marble_format import (FORMAT, FORMAT_VERSION, build_model, check_keys,
                                              text_is_external)
from marble.checkpoints.tensor_file import Header, read_header, read_tensors, safetensors_writer
from marble.fileio import write_new
from marble.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from marble.models.skeleton import skeleton

ToMarble = Callable[[str, torch.Tensor], "list[tuple[str, torch.Tensor]] | None"]


@dataclass
class Checkpoint:
    config: LatentDiffusionConfig
    state: dict[str, torch.Tensor]    # marble keys, stored dtypes (or the dtype asked for)
    source: Path
    hash: str                         # A1111 "Model hash": first 10 hex of the file's sha256
    kind: str                         # "marble" | "diffusers" | "single-file"

    @property
    def name(self) -> str:
        return self.source.stem if self.source.is_file() else self.source.name

    def with_prediction(self, prediction: str | None) -> "Checkpoint":
        if prediction is None or prediction == self.config.prediction:
            return self
        return replace(self, config=self.config.replace(prediction=prediction))


# --- where tensors come from ----------------------------------------------------------------------

class TensorSource(Protocol):
    path: Path

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]: ...

    def read(self, names: Iterable[str], dtype: torch.dtype | None) -> Iterable[tuple[str, torch.Tensor]]: ...


class SafetensorsSource:
    """One safetensors file, or the shards of one component (diffusers' *.safetensors.index.json)."""

    def __init__(self, headers: list[Header], path: Path):
        self.headers, self.path = headers, path
        self._owner = {name: h for h in headers for name in h.entries}

    @classmethod
    def open(cls, path: Path) -> "SafetensorsSource":
        return cls([read_header(path)], Path(path))

    def shapes(self):
        return {k: (e.shape, e.dtype) for h in self.headers for k, e in h.entries.items()}

    def read(self, names, dtype):
        names = set(names)
        for h in self.headers:
            yield from read_tensors(h, [n for n in h.entries if n in names], dtype)


class PickleSource:
    """Tensors from a torch pickle, unpickled only through torch.load(weights_only=True): the
    restricted unpickler builds tensors and plain containers and refuses any other object."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"{self.path}: torch.load(weights_only=True) refused or failed to read it "
                                 f"({first[:200]}); marble does not run pickled code") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]   # Lightning / ldm training checkpoints
        if not isinstance(obj, dict):
            raise ModelLoadError(f"{self.path} holds a {type(obj).__name__}, not a dict of tensors")
        self.tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}

    def shapes(self):
        return {k: (tuple(v.shape), v.dtype) for k, v in self.tensors.items()}

    def read(self, names, dtype):
        for name in names:
            t = self.tensors[name]
            yield name, t.to(dtype) if dtype is not None and t.is_floating_point() else t


# --- reading ---------------------------------------------------------------------------------------

def expected_state(config: LatentDiffusionConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict a config needs (meta tensors: shapes only), optionally one component's."""
    with skeleton():
        model = LatentDiffusion(config, text_encoder=_meta_text(config))
    external = text_is_external(config)
    return {k: v for k, v in model.state_dict().items()
            if k.startswith(prefix) and not (external and k.startswith("text_encoder."))}


def _meta_text(config: LatentDiffusionConfig):
    """A pretrained (package-shipped) text encoder is not part of the file: stand in a tiny module."""
    return torch.nn.Identity() if text_is_external(config) else None


def convert_state(source: TensorSource, to_marble: ToMarble, expected: dict[str, torch.Tensor],
                  dtype: torch.dtype | None, describe: Callable[[str], str] = lambda k: k) -> dict[str, torch.Tensor]:
    """Read `source` into marble keys. Keys are checked against `expected` first (on meta tensors),
    so a wrong file fails fast with the keys named; `describe` turns a marble key back into the
    file's own name for those messages."""
    used, unknown, found = [], [], {}
    for name, (shape, stored) in source.shapes().items():
        out = to_marble(name, torch.empty(shape, dtype=stored, device="meta"))
        if out is None:
            unknown.append(name)
        elif out:
            used.append(name)
            found.update(out)
    found_named = {describe(k): v for k, v in found.items()}
    found_named.update({name: torch.empty(0, device="meta") for name in unknown})
    check_keys(source.path, {describe(k): v for k, v in expected.items()}, found_named)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in source.read(used, dtype):
        state.update(to_marble(name, tensor))
    return state


def file_sha256(paths: Iterable[Path]) -> str:
    """First 10 hex of the sha256 of the files' bytes, concatenated in the order given (one file:
    A1111's "Model hash")."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:10]


def read_marble(path: Path, dtype: torch.dtype | None = None) -> Checkpoint:
    """A marble model file, streamed (the same file `marble_format.load_model_file` reads)."""
    path = Path(path)
    header = read_header(path)
    if header.metadata.get("format") != FORMAT:
        raise ModelLoadError(f"{path} is a safetensors file but not a marble model (no marble config in its metadata)")
    try:
        config = LatentDiffusionConfig.from_dict(json.loads(header.metadata["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: the model config in the metadata is invalid ({e})") from None
    state = convert_state(SafetensorsSource([header], path), lambda k, t: [(k, t)], expected_state(config), dtype)
    return Checkpoint(config, state, path, file_sha256([path]), "marble")


# --- models <-> checkpoints ------------------------------------------------------------------------

def to_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> LatentDiffusion:
    """Build the model around the checkpoint's tensors (meta-device construction, then adoption:
    no second copy when the tensors already have `dtype`)."""
    state, ckpt.state = ckpt.state, {}   # hand the tensors over, so a cast can free the originals
    model = build_model(ckpt.config, state, ckpt.source, dtype)
    model.source = str(ckpt.source)
    return model


def from_model(model: LatentDiffusion, source: Path | str = "memory", hash: str = "") -> Checkpoint:
    state = {k: v for k, v in model.state_dict().items()
             if not (text_is_external(model.config) and k.startswith("text_encoder."))}
    return Checkpoint(model.config, state, Path(source), hash, "marble")


def write_marble(ckpt: Checkpoint, path: Path) -> Path:
    """A marble model file (marble_format's layout), written atomically and never over a file."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; marble never overwrites a model file")
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": ckpt.config.to_json()}
    return write_new(path, safetensors_writer(ckpt.state, metadata))
