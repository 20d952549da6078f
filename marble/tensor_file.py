"""Streaming safetensors reading and writing, one tensor at a time: marble's only safetensors code
(model files, diffusers folders, SD single files, training caches, the MiniLM package's weights).

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}},
then the raw little-endian tensor bytes. Reading fills each tensor straight from the file with
`readinto` (no memory map); a tensor to be cast is read into one staging buffer reused for every
tensor and cast from there, so peak memory while loading is the loaded weights plus one tensor. Writing streams each tensor's bytes the same way.
Only tensors and strings are ever read: loading executes no code.

Why not the safetensors library (measured with safetensors 0.8, torch 2.13, on
tests/test_sd_checkpoints.py's 143 MB SD-layout load into float32): `safe_open` memory-maps the
file, and `get_tensor` one at a time then a cast leaves every fp16 page it touched resident until
the file is closed, so an fp16 file peaks at 1.49x the loaded weights (this reader: 0.97x; the
test's bound is 1.3x). Without a cast its tensors stay views of the mapping (0.12x at load, the
weights then live in file-backed pages a later write to the file would change under the model).
Its `save` builds the whole file in memory before writing; the writer here streams.

Opt-in, `map_tensors` (marble's `--low-memory`) does what the reader above avoids on purpose: each
tensor stored in the wanted dtype becomes a zero-copy view of a private, read-only memory map of
the file, so `release` can hand its pages back to the kernel while another stage runs (the next
use re-faults them from the page cache). A write into a mapped tensor faults (the mapping is
read-only): a released page always comes back as the file's bytes, never as something else.
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import json
import math
import mmap
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable

import torch

from marble.errors import ModelLoadError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000   # bytes; the safetensors library's own limit

if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
    raise ImportError("marble's safetensors reader assumes a little-endian machine")


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int            # offset of the first byte, from the start of the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    path: Path
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.entries.items()}


def read_header(path: Path) -> Header:
    """Parse and check the header: every tensor's bytes lie inside the file and match its shape."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path} is not a safetensors file (too short)")
            n = int.from_bytes(head, "little")
            if n <= 1 or n > MAX_HEADER or n + 8 > size:
                raise ModelLoadError(f"{path} is not a valid safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelLoadError(f"{path} is not a valid safetensors file (unreadable header)") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a valid safetensors file (header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ModelLoadError(f"{path} is not a valid safetensors file (metadata is not a string map)")
    data_start = 8 + n
    entries = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{path}: tensor {name!r} has an invalid or unsupported header entry") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if any(s < 0 for s in shape) or end - begin != math.prod(shape) * itemsize or begin < 0 \
                or data_start + end > size:
            raise ModelLoadError(f"{path} is truncated or corrupt (tensor {name!r} does not fit the file)")
        entries[name] = TensorEntry(dtype, shape, data_start + begin, data_start + end)
    return Header(path, entries, dict(meta))


def _read_into(f: IO[bytes], entry: TensorEntry, path: Path, name: str,
               staging: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor's bytes from the file: into a new tensor, or into the front of `staging` (bytes,
    reused by the caller) as a view that the next read overwrites."""
    if staging is None:
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        flat = tensor.reshape(-1).view(torch.uint8)
    else:
        flat = staging[:entry.nbytes]
        tensor = flat.view(entry.dtype).view(entry.shape)
    if entry.nbytes:
        f.seek(entry.begin)
        got = f.readinto(memoryview(flat.numpy()))
        if got != entry.nbytes:
            raise ModelLoadError(f"{path} is truncated (tensor {name!r})")
    return tensor


def read_tensors(header: Header, names: Iterable[str] | None = None,
                 dtype: torch.dtype | None = None) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in file order, each read on its own; floating tensors are cast to
    `dtype` when given (None keeps the stored dtype, bit for bit)."""
    wanted = header.entries if names is None else {k: header.entries[k] for k in names}
    order = sorted(wanted, key=lambda k: wanted[k].begin)

    def cast(e: TensorEntry) -> bool:
        return dtype is not None and e.dtype.is_floating_point and e.dtype != dtype

    # A tensor that is cast is read into one reused buffer, not a new one each: its pages fault
    # once, not once per tensor (an fp16 SD1.5 file read as fp32: 2.1 GB of first touches saved).
    staging = torch.empty(max((e.nbytes for e in wanted.values() if cast(e)), default=0), dtype=torch.uint8)
    try:
        with open(header.path, "rb") as f:
            for name in order:
                e = wanted[name]
                if cast(e):
                    yield name, _read_into(f, e, header.path, name, staging).to(dtype)
                else:
                    yield name, _read_into(f, e, header.path, name)
    except OSError as e:
        raise ModelLoadError(f"cannot read {header.path}: {e.strerror or e}") from None


def map_tensors(header: Header, names: Iterable[str] | None = None,
                dtype: torch.dtype | None = None) -> Iterable[tuple[str, torch.Tensor]]:
    """As read_tensors, but a tensor already in `dtype` (or any, when None) whose offset suits its
    dtype is a read-only view of a private memory map of the file, not a copy. The others are read
    (and cast) as read_tensors does. The file must not be written in place while mapped."""
    wanted = header.entries if names is None else {k: header.entries[k] for k in names}
    try:
        with open(header.path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
            for name in sorted(wanted, key=lambda k: wanted[k].begin):
                e = wanted[name]
                keep = dtype is None or not e.dtype.is_floating_point or e.dtype == dtype
                itemsize = torch.empty((), dtype=e.dtype).element_size()
                if not keep or not e.nbytes or e.begin % itemsize or e.end > len(mapping):
                    tensor = _read_into(f, e, header.path, name)
                    yield name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
                    continue
                with warnings.catch_warnings():   # torch warns that the buffer is read-only: on purpose
                    warnings.simplefilter("ignore", UserWarning)
                    flat = torch.frombuffer(mapping, dtype=e.dtype, count=e.nbytes // itemsize, offset=e.begin)
                yield name, flat.view(e.shape)
    except OSError as e:
        raise ModelLoadError(f"cannot read {header.path}: {e.strerror or e}") from None


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4   # linux/mman.h


def _read_only_file_maps() -> list[tuple[int, int]]:
    """[start, end) of this process's read-only private file mappings (/proc/self/maps, Linux):
    the only pages `release` ever drops, since their content is always the file's."""
    spans = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[1] == "r--p" and fields[5].startswith("/"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    spans.append((start, end))
    except OSError:
        return []
    return spans


def _mapped_storages(tensors: Iterable[torch.Tensor]) -> dict[int, tuple[int, int]]:
    """{storage address: (its bytes, end of the read-only file mapping it lies in)} for the tensors
    among `tensors` that are views of such a mapping."""
    spans = sorted(_read_only_file_maps())
    starts = [start for start, _ in spans]
    found = {}
    for t in tensors:
        storage = t.untyped_storage()
        begin = storage.data_ptr()
        i = bisect.bisect_right(starts, begin) - 1
        if i >= 0 and begin < spans[i][1]:
            found[begin] = (storage.nbytes(), spans[i][1])
    return found


def mapped_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """How many bytes of `tensors` are views of a read-only file mapping (each storage once)."""
    return sum(n for n, _ in _mapped_storages(tensors).values())


@functools.cache
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def release(tensors: Iterable[torch.Tensor]) -> int:
    """Drop this process's pages of the memory-mapped tensors among `tensors` (madvise
    MADV_DONTNEED on their page-rounded byte ranges), so RSS no longer counts them; the next read
    re-faults them from the page cache (or the disk, if the kernel evicted them), bit for bit the
    file's bytes. Tensors that are not mapped are left alone. Returns the bytes released."""
    merged: list[list[int]] = []
    for begin, (nbytes, end) in sorted(_mapped_storages(tensors).items()):
        lo, hi = begin - begin % _PAGE, min(end, -(-(begin + nbytes) // _PAGE) * _PAGE)
        if merged and lo <= merged[-1][1]:   # neighbours: one call per run of adjacent tensors
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return sum(hi - lo for lo, hi in merged if _madvise()(lo, hi - lo, _MADV_DONTNEED) == 0)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (made contiguous on the CPU), without a copy when it already is."""
    t = tensor.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def safetensors_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                       fill: Callable[[str], torch.Tensor] | None = None) -> Callable[[IO[bytes]], None]:
    """A function that writes `tensors` as a safetensors file to an open binary file, one tensor
    at a time (for marble.fileio.write_new). Keys are written sorted; the header is padded with
    spaces to a multiple of 8 bytes, as the reference implementation does. `fill(name)`, when
    given, makes each tensor's values as it is written (in that order), so `tensors` need only
    give shapes and dtypes (meta tensors will do): a file larger than RAM, held one tensor at a time."""
    names = sorted(tensors)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"cannot store {name} of dtype {t.dtype} in safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    def write(f: IO[bytes]) -> None:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            if not tensors[name].numel():
                continue
            t = tensors[name] if fill is None else fill(name)
            if t.shape != tensors[name].shape or t.dtype != tensors[name].dtype:
                raise ValueError(f"{name}: filled as {t.dtype} {tuple(t.shape)}, declared "
                                 f"{tensors[name].dtype} {tuple(tensors[name].shape)}")
            f.write(tensor_bytes(t))

    return write
