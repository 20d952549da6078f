"""Atomic file writes: a reader never sees a half-written file.

`write_new` never replaces an existing file (outputs, model files); `write_replace` atomically
replaces its predecessor (training checkpoints, logs, plots).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()   # read once at import: os.umask is process-wide, so never toggle it from threads


def _write_temp(path: Path, write: Callable[[IO[bytes]], None]) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less the umask)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_new(path: Path, data: bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write a new file; FileExistsError if `path` exists (hard link is atomic and never replaces)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path, data if callable(data) else (lambda f: f.write(data)))
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path


def write_replace(path: Path, data: bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write or atomically replace `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path, data if callable(data) else (lambda f: f.write(data)))
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)   # e.g. `path` is a folder: leave no temporary file behind
        raise
    return path
