"""Atomic file writes, checksums, and the build's `manifest.json` (read and write).

Every file a reader may look at is written to a temporary name in the same folder and renamed
into place (`os.replace` is atomic on POSIX), so a reader never sees half a file, and a build
killed at any moment leaves only complete files plus `.tmp` leftovers that the next run removes.

manifest.json (schema `MANIFEST_VERSION`, written last by `maws_data.build`):
    {"schema": 1, "inputs": [{"path", "sha256", "bytes"}], "config": {...resolved BuildConfig...},
     "fingerprint": str, "counts": {"rows", "written", "labeled", "unlabeled", "skipped": {reason: n}},
     "classes": int, "shards": [{"name", "samples", "labeled", "sha256", "bytes", "rows", "sqrt_weight"}]}
    counts also has "caption_missing": samples written whose caption was null (kept, unlabeled).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` via a temporary file in the same folder, fsync, then rename. A reader
    never sees half of it; `durable=False` skips the fsync, for scratch files that a crashed build
    recomputes anyway (the text pass's spills and tables: an fsync each held the scan round's
    processes off the CPU ~16% of the time, docs/data.md)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Stable JSON text: sorted keys, fixed indent, trailing newline (two builds give equal bytes)."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj))


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete leftovers of interrupted atomic writes (`.<name>.*.tmp`) directly in `folder`."""
    removed = []
    for p in sorted(Path(folder).glob(f".*{TMP_SUFFIX}")):
        if p.is_file():
            p.unlink()
            removed.append(p)
    return removed


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    """Check the counts add up, then write `out_dir/manifest.json` atomically."""
    counts = manifest["counts"]
    skipped = sum(counts["skipped"].values())
    if counts["written"] + skipped != counts["rows"]:
        raise AssertionError(f"manifest counts do not add up: written {counts['written']} + skipped "
                             f"{skipped} != rows {counts['rows']}")
    if counts["labeled"] + counts["unlabeled"] != counts["written"]:
        raise AssertionError(f"manifest counts do not add up: labeled {counts['labeled']} + unlabeled "
                             f"{counts['unlabeled']} != written {counts['written']}")
    from maws_data import storage

    path = storage.join(str(out_dir), MANIFEST_NAME)
    write_json(path, {"schema": MANIFEST_VERSION, **manifest})
    return Path(path) if not storage.is_remote(path) else path


def read_manifest(out_dir: str | Path) -> dict:
    """The manifest of a finished build; a clear error when the folder is not one."""
    from maws_data import storage

    path = storage.join(str(out_dir), MANIFEST_NAME) if storage.is_remote(str(out_dir)) else Path(out_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(read_bytes(str(path)).decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest.json; is {out_dir} the --out folder of a finished "
                                "`maws-data build`?") from None
    if manifest.get("schema") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest schema {manifest.get('schema')!r}, this maws-data reads "
                         f"schema {MANIFEST_VERSION}")
    return manifest


# ---------------------------------------------------------------------------------------------
# The same for a build folder that may be on object storage (`s3://bucket/prefix`): a local path
# gets the atomic temp-and-rename above; an object store makes each PUT atomic by itself (an object
# appears only when its upload completes), so a remote write never leaves half an object.


def write_bytes(url: str, data: bytes, *, durable: bool = True) -> None:
    """`data` to a local path (atomically; see atomic_write_bytes for `durable`) or an object."""
    from maws_data import storage

    if storage.is_remote(url):
        fs, path = storage.filesystem(url)
        fs.pipe_file(path, data)
    else:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(url, data, durable=durable)


def read_bytes(url: str) -> bytes:
    from maws_data import storage

    if storage.is_remote(url):
        fs, path = storage.filesystem(url)
        return fs.cat_file(path)
    return Path(url).read_bytes()


def exists(url: str) -> bool:
    from maws_data import storage

    fs, path = storage.filesystem(url)
    return fs.exists(path)


def remove(url: str) -> None:
    """Delete a file or a whole folder/prefix, if there."""
    from maws_data import storage

    fs, path = storage.filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_json(url: str, obj: Any, *, compact: bool = False) -> None:
    """Stable JSON (sorted keys). `compact` for large machine-read files: json's C encoder runs
    only without an indent, and an indented shard stats file of 1,000 skipped rows costs ~25 ms."""
    text = (json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n") if compact \
        else dumps_json(obj)
    write_bytes(url, text.encode("utf-8"))
