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
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Protocol

import torch

from marble.checkpoints.file_hashes import file_sha256
from marble.config import config_from_json
from marble.errors import ModelLoadError
from marble.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from marble.models.skeleton import skeleton
from marble.models.text import build_text_encoder, text_encoder_is_pretrained
from marble.models.weight_cast import store_weights
from marble.tensor_file import Header, map_tensors, read_header, read_tensors, safetensors_writer

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

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


def text_is_external(config: LatentDiffusionConfig) -> bool:
    """Pretrained text encoders are loaded from their package, not stored in the model file."""
    return text_encoder_is_pretrained(config.text)


def refuse_existing(path: Path) -> Path:
    """Checked before anything is read or written: marble never replaces a model."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; marble never overwrites a model file")
    return path


# --- where tensors come from ----------------------------------------------------------------------

class TensorSource(Protocol):
    path: Path

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]: ...

    def read(self, names: Iterable[str], dtype: torch.dtype | None) -> Iterable[tuple[str, torch.Tensor]]: ...


class SafetensorsSource:
    """One safetensors file, or the shards of one component (diffusers' *.safetensors.index.json).
    `mapped`: tensors already in the dtype asked for are views of a read-only memory map of the
    file, not copies (tensor_file.map_tensors; `--low-memory`)."""

    def __init__(self, headers: list[Header], path: Path, mapped: bool = False):
        self.headers, self.path, self.mapped = headers, path, mapped
        self._owner = {name: h for h in headers for name in h.entries}

    @classmethod
    def open(cls, path: Path, mapped: bool = False) -> "SafetensorsSource":
        return cls([read_header(path)], Path(path), mapped)

    def shapes(self):
        return {k: (e.shape, e.dtype) for h in self.headers for k, e in h.entries.items()}

    def read(self, names, dtype):
        names = set(names)
        reader = map_tensors if self.mapped else read_tensors
        for h in self.headers:
            yield from reader(h, [n for n in h.entries if n in names], dtype)


def open_source(path: Path, allow_pickle: bool, mapped: bool = False) -> TensorSource:
    """The tensors of one file: safetensors (memory-mapped where `mapped`), or a pickle only when
    the user allowed it."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise pickle_refused(path)
        return PickleSource(path)
    return SafetensorsSource.open(path, mapped)


def pickle_refused(path: Path) -> ModelLoadError:
    return ModelLoadError(f"{path} is a pickle checkpoint; marble reads it only when asked (--allow-pickle), "
                          "through torch.load(weights_only=True); prefer .safetensors")


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
        # a transposed view of a mapped tensor would slow every call: copied (contiguous views stay)
        state.update((k, t.contiguous()) for k, t in to_marble(name, tensor))
    return state


def check_keys(path: Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Missing, unexpected and misshapen keys, named (at most five of each) in one line."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:5])}{', …' if len(unexpected) > 5 else ''})")
        raise ModelLoadError(f"{path} does not match its config: {'; '.join(parts)}")
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(found[k].shape)]
    if bad:
        k = bad[0]
        raise ModelLoadError(f"{path}: {len(bad)} tensors have the wrong shape, e.g. {k} is "
                             f"{tuple(found[k].shape)}, expected {tuple(expected[k].shape)}")


def config_from_metadata(path: Path, text: str | None, cls: type, what: str):
    """The typed config a file stores as JSON in its safetensors metadata."""
    try:
        return config_from_json(cls, text, f"{what} config")
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: the {what} config in the metadata is invalid ({e})") from None


# --- hashes ----------------------------------------------------------------------------------------

def file_hash(*paths: Path) -> str:
    """First 10 hex of the sha256 of the files' bytes, concatenated in the order given (one file:
    A1111's "Model hash"); computed once per change of the files (marble.checkpoints.file_hashes)."""
    return file_sha256(*paths)[:10]


def state_hash(model: LatentDiffusion) -> str:
    """For models that have no file (e.g. seeded random ones): the hash the model's file would have
    without metadata."""
    h = hashlib.sha256()
    safetensors_writer(from_model(model).state)(SimpleNamespace(write=h.update))   # the file's bytes, hashed as written
    return h.hexdigest()[:10]


# --- models <-> checkpoints ------------------------------------------------------------------------

def component_dtype(config: LatentDiffusionConfig, key: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is loaded in: the model's, but a `decode_fp32` VAE stays float32 under fp16."""
    if key.startswith("vae.") and config.vae.decode_fp32 and dtype == torch.float16:
        return torch.float32
    return dtype


def build_model(config: LatentDiffusionConfig, state: dict[str, torch.Tensor], source: Path,
                dtype: torch.dtype = torch.float32, storage: torch.dtype | None = None) -> LatentDiffusion:
    """Build the networks without allocating weights (meta device), then adopt the loaded tensors:
    peak memory stays near the size of the weights. `storage`: every floating tensor is kept in it
    and the layers compute in `dtype` (weight_cast.store_weights; a decode_fp32 VAE then computes
    in `dtype` too, so it needs no float32 copy)."""
    external = text_is_external(config)
    text = build_text_encoder(config.text) if external else None
    with skeleton():
        model = LatentDiffusion(config, text_encoder=text)
    expected = {k: v for k, v in model.state_dict().items() if not (external and k.startswith("text_encoder."))}
    check_keys(source, expected, state)
    state = {k: (v.to(storage or component_dtype(config, k, dtype)) if v.is_floating_point() else v)
             for k, v in state.items()}
    model.load_state_dict(state, strict=not external, assign=True)
    if storage is not None:
        store_weights(model, storage, compute=dtype)
    return model.eval().requires_grad_(False)


def to_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, storage: torch.dtype | None = None) -> LatentDiffusion:
    """Build the model around the checkpoint's tensors (meta-device construction, then adoption:
    no second copy when the tensors already have `dtype`, or `storage` when given: build_model)."""
    state, ckpt.state = ckpt.state, {}   # hand the tensors over, so a cast can free the originals
    model = build_model(ckpt.config, state, ckpt.source, dtype, storage)
    model.source = str(ckpt.source)
    return model


def from_model(model: LatentDiffusion, source: Path | str = "memory", hash: str = "",
               dtype: torch.dtype | None = None) -> Checkpoint:
    """The model's weights as a checkpoint (a package's pretrained text encoder left out); `dtype`
    casts the floating tensors (e.g. fp16 to ship)."""
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             for k, v in model.state_dict().items()
             if not (text_is_external(model.config) and k.startswith("text_encoder."))}
    return Checkpoint(model.config, state, Path(source), hash, "marble")
