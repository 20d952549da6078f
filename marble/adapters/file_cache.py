"""Adapter files (LoRAs, ControlNets) read once per model and kept, least recently used dropped first.

A file is known by its resolved path, size and modification time, so one replaced on disk is read
again. The lock makes it safe to call from the server's I/O threads; two threads that miss at
once both read, and the second result wins (reads are pure).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Generic, Hashable, TypeVar

T = TypeVar("T")


class FileCache(Generic[T]):
    def __init__(self, keep: int):
        self.keep = keep
        self._items: OrderedDict[tuple, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, read: Callable[[], T], *extra: Hashable) -> T:
        """`read()`'s result for `path` (and `extra`, other inputs the result depends on), cached."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, *extra)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        item = read()
        with self._lock:
            self._items[key] = item
            while len(self._items) > self.keep:
                self._items.popitem(last=False)
        return item
