"""The model-file hash cache (marble/checkpoints/file_hashes.py): the hash is hashlib's, a file is
read once per change of its path, size or mtime_ns, across processes too (each test that claims
"not read" first forgets the process's memory, as a new process would), and a broken or
unwritable cache is never an error."""
import builtins
import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from marble.checkpoints import file_hashes
from marble.checkpoints.checkpoint import file_hash
from marble.checkpoints.file_hashes import CACHE_NAME, cache_dir, cached_sha256, file_sha256

pytestmark = pytest.mark.unit


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache folder and a process that has hashed nothing yet; the cache file's path."""
    monkeypatch.setenv("MARBLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(file_hashes, "_known", {})
    return tmp_path / "cache" / CACHE_NAME


@pytest.fixture
def reads(monkeypatch) -> list:
    """The files every hash computation reads, in order (the real reader still runs)."""
    seen = []
    real = file_hashes._read_sha256

    def counting(paths):
        seen.append([Path(p).name for p in paths])
        return real(paths)
    monkeypatch.setattr(file_hashes, "_read_sha256", counting)
    return seen


def new_process(monkeypatch) -> None:
    """Forget what this process hashed: only the cache file can answer now."""
    monkeypatch.setattr(file_hashes, "_known", {})


def no_open_of(path: Path, monkeypatch) -> None:
    """Fail the test if anything opens `path` (builtins.open and io.open, which pathlib uses)."""
    real = io.open
    target = path.resolve()

    def guarded(file, *args, **kw):
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == target:
            raise AssertionError(f"{path} was opened")
        return real(file, *args, **kw)
    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)


def sha(*datas: bytes) -> str:
    return hashlib.sha256(b"".join(datas)).hexdigest()


def entries(cache_file: Path) -> list[dict]:
    data = json.loads(cache_file.read_bytes())
    assert data["format"] == 1
    return data["entries"]


def test_the_hash_is_hashlibs_and_a_second_run_does_not_open_the_file(tmp_path, cache, reads, monkeypatch):
    data = os.urandom(3 * 2**20 + 5)   # more than one 1 MiB read block
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    assert file_sha256(path) == sha(data)
    assert file_hash(path) == sha(data)[:10]   # A1111's model hash, from the same cache
    assert reads == [["m.safetensors"]]
    assert entries(cache) == [{"files": [[str(path.resolve()), len(data), path.stat().st_mtime_ns]],
                               "sha256": sha(data)}]
    new_process(monkeypatch)
    no_open_of(path, monkeypatch)
    assert file_sha256(path) == sha(data) and cached_sha256(path) == sha(data)
    (tmp_path / "sub").mkdir()
    assert file_hash(tmp_path / "sub" / ".." / "m.safetensors") == sha(data)[:10]   # the resolved path is the key
    assert reads == [["m.safetensors"]]


def test_a_new_mtime_or_size_is_a_new_hash_and_the_stale_entry_is_dropped(tmp_path, cache, reads, monkeypatch):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"abc")
    assert file_sha256(path) == sha(b"abc")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))   # touched, same bytes
    assert cached_sha256(path) is None
    assert file_sha256(path) == sha(b"abc") and len(reads) == 2
    mtime = path.stat().st_mtime_ns
    path.write_bytes(b"abcd")
    os.utime(path, ns=(st.st_atime_ns, mtime))   # another size under the same mtime_ns
    new_process(monkeypatch)
    assert file_sha256(path) == sha(b"abcd") and len(reads) == 3
    assert entries(cache) == [{"files": [[str(path.resolve()), 4, mtime]], "sha256": sha(b"abcd")}]
    # the one miss the docstring accepts: new bytes under the same size and mtime_ns keep the old hash
    path.write_bytes(b"wxyz")
    os.utime(path, ns=(st.st_atime_ns, mtime))
    new_process(monkeypatch)
    assert file_sha256(path) == sha(b"abcd") and len(reads) == 3


def test_a_file_that_changes_while_it_is_read_is_not_cached(tmp_path, cache, monkeypatch):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    real = file_hashes._read_sha256

    def read_then_rewrite(paths):
        digest = real(paths)
        path.write_bytes(b"newer")   # a copy still being written, say
        return digest
    monkeypatch.setattr(file_hashes, "_read_sha256", read_then_rewrite)
    assert file_sha256(path) == sha(b"old")   # what was read, as without the cache ...
    assert cached_sha256(path) is None and not cache.exists()   # ... but never kept under the new stat
    assert file_hashes._known == {}


def test_several_files_are_one_stream_keyed_by_all_of_them_in_order(tmp_path, cache, reads, monkeypatch):
    """A diffusers folder's hash: the files concatenated, as before the cache."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"unet" * 1000)
    b.write_bytes(b"vae" * 700)
    assert file_hash(a, b) == sha(a.read_bytes(), b.read_bytes())[:10]
    assert file_hash(b, a) == sha(b.read_bytes(), a.read_bytes())[:10]
    assert file_hash(a) == sha(a.read_bytes())[:10]
    assert reads == [["a.safetensors", "b.safetensors"], ["b.safetensors", "a.safetensors"], ["a.safetensors"]]
    new_process(monkeypatch)
    assert file_hash(a, b) == sha(a.read_bytes(), b.read_bytes())[:10] and len(reads) == 3
    st = b.stat()
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 1))   # one file of the set changed: the set is re-read
    assert file_hash(a, b) == sha(a.read_bytes(), b.read_bytes())[:10] and len(reads) == 4


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"{", b"[]", b'{"format": 2, "entries": []}',
                                     b'{"format": 1, "entries": {}}', b"[" * 100000, b""])
def test_a_corrupt_cache_file_is_ignored_and_replaced(tmp_path, cache, reads, content):
    cache.parent.mkdir()
    cache.write_bytes(content)
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"weights")
    assert file_sha256(path) == sha(b"weights")
    assert entries(cache) == [{"files": [[str(path.resolve()), 7, path.stat().st_mtime_ns]], "sha256": sha(b"weights")}]


def test_malformed_entries_are_skipped_one_by_one(tmp_path, cache, reads, monkeypatch):
    good, other = tmp_path / "good.safetensors", tmp_path / "other.safetensors"
    good.write_bytes(b"good")
    other.write_bytes(b"other")
    key = [str(good.resolve()), 4, good.stat().st_mtime_ns]
    okey = [str(other.resolve()), 5, other.stat().st_mtime_ns]
    cache.parent.mkdir()
    cache.write_text(json.dumps({"format": 1, "entries": [
        {"files": [okey], "sha256": "0" * 63 + "g"},     # not hex
        {"files": [okey], "sha256": "AB" * 32},          # not marble's lowercase hex
        {"files": [okey[:2]], "sha256": "1" * 64},       # no mtime
        {"files": [], "sha256": "2" * 64},               # no files
        {"sha256": "3" * 64}, "text", None, 7,
        {"files": [key], "sha256": "4" * 64},            # taken at its word: the key matches
    ]}))
    assert file_sha256(good) == "4" * 64 and file_sha256(other) == sha(b"other")
    assert reads == [["other.safetensors"]]
    assert entries(cache) == [{"files": [key], "sha256": "4" * 64}, {"files": [okey], "sha256": sha(b"other")}]


@pytest.mark.parametrize("where", ["under a file", "is a file", "cache file is a folder"])
def test_an_unwritable_cache_still_gives_the_hash_and_remembers_it_in_the_process(tmp_path, reads, monkeypatch, where):
    blocker = tmp_path / "blocker"
    if where == "cache file is a folder":
        blocker.mkdir()
        (blocker / CACHE_NAME).mkdir()
        folder = blocker
    else:
        blocker.write_bytes(b"")
        folder = blocker / "sub" if where == "under a file" else blocker
    monkeypatch.setenv("MARBLE_CACHE_DIR", str(folder))
    new_process(monkeypatch)
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"weights")
    assert file_sha256(path) == sha(b"weights") and file_sha256(path) == sha(b"weights")
    assert len(reads) == 1   # the second call: the process remembers
    new_process(monkeypatch)
    assert file_hash(path) == sha(b"weights")[:10] and len(reads) == 2   # nothing on disk to remember
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["blocker", "m.safetensors"] + (
        [CACHE_NAME] if where == "cache file is a folder" else []))   # no temporary file left behind


def test_the_cache_is_bounded_and_drops_files_that_are_gone(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(file_hashes, "KEEP", 3)
    paths = [tmp_path / f"m{i}.safetensors" for i in range(5)]
    for i, path in enumerate(paths):
        path.write_bytes(bytes([i]))
        file_sha256(path)
    assert [e["files"][0][0] for e in entries(cache)] == [str(p.resolve()) for p in paths[2:]]
    assert len(file_hashes._known) == 3
    paths[3].unlink()
    extra = tmp_path / "m5.safetensors"
    extra.write_bytes(b"5")
    file_sha256(extra)
    assert [e["files"][0][0] for e in entries(cache)] == [str(p.resolve()) for p in (paths[2], paths[4], extra)]


def test_the_cache_folder_follows_marble_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MARBLE_CACHE_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache_dir() == tmp_path / "m"
    monkeypatch.delenv("MARBLE_CACHE_DIR")
    assert cache_dir() == tmp_path / "x" / "marble"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")   # the XDG spec: relative paths are ignored
    assert cache_dir() == tmp_path / "h" / ".cache" / "marble"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "h" / ".cache" / "marble"


def test_the_shipped_models_hash_is_unchanged_and_a_second_load_does_not_read_it(cache, reads, monkeypatch):
    """The PNG record's "Model hash" of the built-in model: hashlib's, cold and warm."""
    from marble.checkpoints.resolve import builtin_path, load_model
    want = hashlib.sha256(builtin_path().read_bytes()).hexdigest()[:10]
    assert load_model("builtin").hash == want
    new_process(monkeypatch)
    assert load_model("builtin").hash == want
    assert reads == [["builtin.safetensors"]]


def test_the_server_catalog_hashes_a_file_once_across_restarts(tmp_path, cache, reads, monkeypatch):
    from marble.server.catalog import ModelCatalog
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "m.safetensors").write_bytes(b"weights")
    want = sha(b"weights")
    catalog = ModelCatalog(folder)
    [entry] = catalog.entries()
    assert catalog.sha256(entry) is None   # not loaded yet: not hashed for a listing
    assert file_hash(entry.path) == want[:10]   # the load hashes it ...
    assert catalog.sha256(entry) == want and catalog.remember(entry) == want   # ... and the catalog reuses it
    assert reads == [["m.safetensors"]]
    new_process(monkeypatch)   # a restarted server
    catalog = ModelCatalog(folder)
    no_open_of(entry.path, monkeypatch)
    assert catalog.sha256(entry) == want and catalog.remember(entry) == want
    assert reads == [["m.safetensors"]]
