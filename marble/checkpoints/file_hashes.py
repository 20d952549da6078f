"""The sha256 of model files, computed once per file change and remembered across runs.

A1111's "Model hash" is the sha256 of the whole file: 1.4 s for a 2.1 GB SD1.5 file and ~4.6 s
for a 6.9 GB SDXL file at every load (docs/bench.md). Like A1111's `cache.json`, marble keeps
the hashes it has computed in `file-hashes.json` in its cache folder (`cache_dir()`), each under
the files' resolved paths, sizes and modification times (st_mtime_ns), so a file is read again
only when one of those changes.

The one miss this accepts: a file rewritten in place with the same size and the same mtime_ns
(which takes a deliberate `touch -d` or a file system with coarse timestamps) keeps its old hash.
A1111 accepts the same (its cache compares the modification time alone).

The cache is an optimisation and never an error: an unreadable or corrupt cache file is ignored
(and replaced at the next write), an unwritable cache folder means hashes are remembered for this
process only. Writes replace the file atomically, keep at most `KEEP` entries (the newest) and
drop those whose files are gone or changed. Two processes writing at once can lose one of the
two new entries, which costs a re-hash later, never a wrong hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from marble.fileio import write_replace

KEEP = 4096                    # entries kept: far more model files than anyone has, a bounded file
CACHE_NAME = "file-hashes.json"
HEX = set("0123456789abcdef")
FORMAT = 1                     # the file's layout version; another version is ignored (and replaced)

FileKey = tuple[str, int, int]     # resolved absolute path, size in bytes, st_mtime_ns
Key = tuple[FileKey, ...]          # the files hashed as one stream, in order

_known: dict[Key, str] = {}        # this process's hashes (also when the cache folder is unwritable)
_lock = threading.Lock()           # the server hashes from several threads


def cache_dir() -> Path:
    """marble's cache folder: $MARBLE_CACHE_DIR, else $XDG_CACHE_HOME/marble, else ~/.cache/marble
    (the XDG base-directory rule: a relative $XDG_CACHE_HOME is ignored)."""
    env = os.environ.get("MARBLE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "marble"


def file_sha256(*paths: Path) -> str:
    """The full sha256 (hex) of the files' bytes, concatenated in the order given; computed once per
    change of the files (path, size, mtime_ns) and remembered in `cache_dir()/file-hashes.json`."""
    if not paths:
        return hashlib.sha256().hexdigest()
    key = _key(paths)
    known = cached_sha256(*paths, key=key)
    if known is not None:
        return known
    digest = _read_sha256(paths)
    if _key(paths) == key:   # the files did not change while they were read: the hash is theirs
        _remember(key, digest)
    return digest


def cached_sha256(*paths: Path, key: Key | None = None) -> str | None:
    """The sha256 `file_sha256` would return, if it is known without reading the files; else None."""
    key = key or _key(paths)
    with _lock:
        if key in _known:
            return _known[key]
        digest = _load_unless_unchanged(_cache_file()).get(key)
        if digest is not None:
            _keep_in_process(key, digest)
        return digest


def _read_sha256(paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _file_key(path) -> FileKey:
    resolved = Path(path).resolve()
    st = resolved.stat()
    return str(resolved), st.st_size, st.st_mtime_ns


def _key(paths) -> Key:
    return tuple(_file_key(p) for p in paths)


def _cache_file() -> Path:
    return cache_dir() / CACHE_NAME


def _load(file: Path) -> dict[Key, str]:
    """The cache file's entries; {} for a missing, unreadable or corrupt file, and malformed
    entries are skipped one by one."""
    try:
        data = json.loads(file.read_bytes())
        if not (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("entries"), list)):
            return {}
        entries = data["entries"]
    except (OSError, ValueError, RecursionError):
        return {}
    out = {}
    for entry in entries:
        try:
            files, digest = entry["files"], entry["sha256"]
            key = tuple((str(p), int(size), int(mtime)) for p, size, mtime in files)
            if key and isinstance(digest, str) and len(digest) == 64 and set(digest) <= HEX:
                out[key] = digest
        except (KeyError, TypeError, ValueError, OverflowError):
            continue
    return out


_parsed: dict[Path, tuple[tuple[int, int], dict[Key, str]]] = {}   # cache file -> ((mtime_ns, size), entries)


def _load_unless_unchanged(file: Path) -> dict[Key, str]:
    """`_load(file)`, parsed again only when the file's mtime or size changed: a model listing asks
    for every entry's hash, and must not parse the whole cache file once per model."""
    try:
        st = file.stat()
    except OSError:
        return {}
    stamp = (st.st_mtime_ns, st.st_size)
    if file not in _parsed or _parsed[file][0] != stamp:
        _parsed[file] = (stamp, _load(file))
    return _parsed[file][1]


def _still_there(key: Key) -> bool:
    try:
        return all(_file_key(path) == (path, size, mtime) for path, size, mtime in key)
    except OSError:
        return False


def _keep_in_process(key: Key, digest: str) -> None:
    _known[key] = digest
    while len(_known) > KEEP:
        del _known[next(iter(_known))]


def _remember(key: Key, digest: str) -> None:
    """Keep `digest` for this process and, when the cache folder is writable, on disk; merged with
    what the file holds now (another process may have added entries)."""
    with _lock:
        _keep_in_process(key, digest)
        file = _cache_file()
        entries = {k: v for k, v in _load(file).items() if k != key and _still_there(k)}
        entries[key] = digest   # newest last, so trimming drops the oldest
        kept = list(entries.items())[-KEEP:]
        data = {"format": FORMAT, "entries": [{"files": [list(f) for f in k], "sha256": v} for k, v in kept]}
        try:
            write_replace(file, json.dumps(data, indent=0).encode())
        except OSError:
            pass   # an unwritable cache folder: no cache on disk, never an error
