"""maws_data.digests: the sha256 of local source files, remembered across builds by their stat."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from maws_data import digests
from maws_data.build import BuildConfig, BuildError, build

HOUR_NS = 3600 * 10**9


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The paths maws_data.digests reads to hash, in order."""
    calls: list[str] = []
    real = digests.sha256_file

    def counting(path, **kw):
        calls.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(digests, "sha256_file", counting)
    return calls


def _settled(path: Path, data: bytes) -> None:
    """Write `data`, then wait out the racy window: its ctime is now, which no call can set back."""
    path.write_bytes(data)
    os.utime(path, ns=(time.time_ns() - HOUR_NS,) * 2)


def test_unchanged_file_is_not_hashed_again(tmp_path, hashed, monkeypatch):
    monkeypatch.setattr(digests, "RACY_S", 0.0)
    f = tmp_path / "a.csv"
    _settled(f, b"key,image,caption\n1,x.jpg,#cat\n")
    sha, entry = digests.digest(f)
    assert sha == hashlib.sha256(f.read_bytes()).hexdigest() and entry is not None
    assert digests.digest(f, entry) == (sha, entry) and hashed == [str(f)]


def test_same_size_rewrite_with_restored_mtime_is_hashed_again(tmp_path, hashed, monkeypatch):
    # what `cp -p` or rsync leave: other bytes, the same size and mtime; only the ctime tells
    monkeypatch.setattr(digests, "RACY_S", 0.0)
    f = tmp_path / "a.csv"
    _settled(f, b"key,image,caption\n1,x.jpg,#cat\n")
    _, entry = digests.digest(f)
    mtime = f.stat().st_mtime_ns
    time.sleep(0.05)  # past a kernel tick: the rewrite gets another ctime
    f.write_bytes(b"key,image,caption\n1,x.jpg,#dog\n")
    os.utime(f, ns=(mtime, mtime))
    assert f.stat().st_size == entry[0][2] and f.stat().st_mtime_ns == entry[0][3]
    sha, again = digests.digest(f, entry)
    assert sha == hashlib.sha256(f.read_bytes()).hexdigest() != entry[1]
    assert again is not None and again[0] != entry[0] and len(hashed) == 2


def test_a_file_changed_just_now_is_not_remembered(tmp_path):
    f = tmp_path / "a.csv"
    f.write_bytes(b"key,image,caption\n")  # mtime and ctime: now, inside RACY_S
    sha, entry = digests.digest(f)
    assert sha == hashlib.sha256(f.read_bytes()).hexdigest() and entry is None


def test_saved_entries_load_back_and_a_broken_file_is_empty(tmp_path):
    path = digests.cache_file(tmp_path, "/data/src")
    entries = {"/data/src/a.parquet": ([1, 2, 3, 4, 5], "ab" * 32)}
    digests.save(path, entries)
    assert digests.load(path) == entries
    path.write_text("{not json")
    assert digests.load(path) == {}
    path.write_text(json.dumps({"version": 99, "files": {}}))
    assert digests.load(path) == {}
    assert digests.load(None) == {} and digests.load(tmp_path / "missing.json") == {}


def _csv_source(folder: Path, captions: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, cap in enumerate(captions):
        _settled(folder / f"part-{i}.csv", f"key,image,caption\nk{i},missing.jpg,{cap}\n".encode())
    return folder


def test_a_rebuild_hashes_no_unchanged_source_file(tmp_path, hashed, monkeypatch):
    """Three CSV files; the second build (in process) reads none of them to hash, and has the same
    fingerprint; a same-size rewrite with its mtime restored is hashed again, and the build sees it."""
    monkeypatch.setattr(digests, "RACY_S", 0.0)
    src = _csv_source(tmp_path / "src", ["#cat #sunset", "#dog", "#beach"])

    def run(out: str, **kw) -> dict:
        build(BuildConfig(source=str(src), out=str(tmp_path / out), processes=1, shard_size=2, min_count=1,
                          decoder="pil", progress=False, mapping_cache=str(tmp_path / "cache"), **kw))
        return json.loads((tmp_path / out / "manifest.json").read_text())

    first = run("a")
    assert len(hashed) == 3
    assert run("b")["fingerprint"] == first["fingerprint"] and len(hashed) == 3
    part = src / "part-1.csv"
    mtime = part.stat().st_mtime_ns
    time.sleep(0.05)
    part.write_bytes(part.read_bytes().replace(b"#dog", b"#cow"))
    os.utime(part, ns=(mtime, mtime))
    with pytest.raises(BuildError, match="different input or config"):
        run("a")
    assert hashed[3:] == [str(part)]
    assert run("c")["fingerprint"] != first["fingerprint"] and len(hashed) == 4  # remembered again
