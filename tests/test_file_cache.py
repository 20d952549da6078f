"""The adapters' file cache: read once, read again when the file changes, least recently used dropped."""
import os

import pytest

from marble.adapters.file_cache import FileCache

pytestmark = pytest.mark.unit


def test_reads_once_rereads_a_changed_file_and_drops_the_least_recently_used(tmp_path):
    reads = []
    cache = FileCache(keep=2)
    a, b, c = (tmp_path / n for n in "abc")
    for p in (a, b, c):
        p.write_text(p.name)

    def get(p, *extra):
        return cache.get(p, lambda: reads.append(p.name) or p.read_text(), *extra)

    assert [get(a), get(a), get(b)] == ["a", "a", "b"] and reads == ["a", "b"]
    get(a)                                                          # a is now the most recently used ...
    get(c)                                                          # ... so c drops b, not a
    get(a)
    assert reads == ["a", "b", "c"]
    get(b)
    assert reads == ["a", "b", "c", "b"]
    assert get(b, "lenient") == "b" and reads[-1] == "b" and len(reads) == 5   # another extra key, another entry
    a.write_text("A, replaced")
    os.utime(a, ns=(1, 1))                                          # a new mtime whatever the clock's grain
    assert get(a) == "A, replaced"
