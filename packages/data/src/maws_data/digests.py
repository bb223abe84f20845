"""The sha256 of local source files, remembered across builds by their stat, as git's index does.

The build fingerprint names every local input by the sha256 of its bytes (`sources.file_identity`).
Hashing the whole source at every build and every resume reads all of it: 0.7 s for the 10^7-row
benchmark source (509 MB, 3.5% of its text pass on one process), minutes for a 10^9-row one. So
each file's digest is kept with the stat it had when it was hashed, and a file whose (device,
inode, size, mtime, ctime) are still those is taken to have that digest. ctime is the check that
matters: no user call sets it (`touch -d`, `cp -p` and rsync restore an mtime, never a ctime), and
every write to the file or change to its inode moves it.

Timestamps are coarse (a kernel tick, ~4 ms), so a file written again within the tick it was hashed
in could keep its stat. A digest is therefore remembered only for a file whose mtime and ctime were
RACY_S or more in the past when it was hashed (git's "racily clean" rule); a file that changed
just before the build is hashed again next time.

One JSON file per source (named by the source string's hash) in the build's cache folder, rewritten
(atomically) after each plan: memory and disk O(files of the source).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from maws_data.manifest import atomic_write_bytes, sha256_file

RACY_S = 2.0  # a file changed less than this before it was hashed is hashed again next time
VERSION = 1

# (stat key, sha256 hex): the stat key is [st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns]
Entry = tuple[list[int], str]


def stat_key(path: str | os.PathLike) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def digest(path: str | os.PathLike, known: Entry | None = None) -> tuple[str, Entry | None]:
    """(sha256 hex of the file, the entry to remember for it, or None when it must not be).

    `known` is the entry remembered from an earlier build; it is used as it is when the file's stat
    still matches it. The stat is taken before and after hashing: a file that changed meanwhile is
    not remembered (its digest is still what was read, and the next build hashes it again)."""
    before = stat_key(path)
    if known is not None and list(known[0]) == before:
        return known[1], known
    hashed_at = time.time_ns()
    sha = sha256_file(path)
    settled = hashed_at - max(before[3], before[4]) >= RACY_S * 1e9
    return sha, ((before, sha) if settled and stat_key(path) == before else None)


def cache_file(cache_dir: str | os.PathLike, source: str) -> Path:
    return Path(cache_dir) / "source-digests" / f"{hashlib.sha256(source.encode()).hexdigest()[:32]}.json"


def load(path: Path | None) -> dict[str, Entry]:
    """The remembered entries, by absolute file path ({} if none, or if the file is unreadable:
    a broken cache only means hashing again)."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes())
        if data.get("version") != VERSION:
            return {}
        return {p: (list(e[0]), str(e[1])) for p, e in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}


def save(path: Path | None, entries: dict[str, Entry]) -> None:
    """Replace the remembered entries (atomically: a reader sees the old file or the new one)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps({"version": VERSION, "files": {p: [list(k), sha] for p, (k, sha) in sorted(entries.items())}},
                      separators=(",", ":"))
    atomic_write_bytes(path, blob.encode(), durable=False)
