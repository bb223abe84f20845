"""Stage 5 of the build, finish: skipped.jsonl and manifest.json, from the shards' stats files.

The stats JSON of every shard (its commit marker) is read back in shard order and streamed: its
skipped rows are appended to skipped.jsonl (shards are row ranges in order, so the file is sorted by
row) and its counts are added up. The manifest is written last of all; nothing else is written after
it, so a folder with a manifest is a finished build.

Memory: O(shards) for the manifest's shard list (+ a small window of stats files being read).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from maws_data import storage
from maws_data.manifest import TMP_SUFFIX, dumps_json, read_bytes, write_manifest
from maws_data.shards import shard_stem
from maws_data.vocab import Vocabulary

SKIPPED_NAME = "skipped.jsonl"
SHARDS_DIR = "shards"
READ_AHEAD = 32  # stats files fetched in parallel (object storage: one request each)


def shard_stats(shards_url: str, count: int) -> Iterator[dict]:
    """Each shard's stats JSON, in shard order, read a few at a time in the background."""
    def read(i: int) -> dict:
        return json.loads(read_bytes(storage.join(shards_url, f"{shard_stem(i)}.json")).decode("utf-8"))

    with ThreadPoolExecutor(8) as pool:
        window: deque = deque()
        for i in range(count):
            window.append(pool.submit(read, i))
            if len(window) >= READ_AHEAD:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


class _LineWriter:
    """skipped.jsonl: locally a temp file renamed into place, remotely one streamed upload (an object
    exists only once its upload completes)."""

    def __init__(self, url: str):
        self.url = url
        if storage.is_remote(url):
            fs, path = storage.filesystem(url)
            self.f = fs.open(path, "wb")
            self.tmp = None
        else:
            fd, self.tmp = tempfile.mkstemp(dir=Path(url).parent, prefix=f".{Path(url).name}.", suffix=TMP_SUFFIX)
            self.f = os.fdopen(fd, "wb")

    def write(self, line: str) -> None:
        self.f.write(line.encode("utf-8"))

    def abort(self) -> None:
        if self.tmp is None:
            discard = getattr(self.f, "discard", None)  # fsspec: abandon the upload, no object appears
            if discard is not None:
                discard()
            return
        self.f.close()
        Path(self.tmp).unlink(missing_ok=True)

    def close(self) -> None:
        if self.tmp is None:
            self.f.close()
            return
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.url)


def finish(out: str, shard_count: int, manifest_head: dict, vocab: Vocabulary) -> dict:
    """Write skipped.jsonl and manifest.json; returns the manifest."""
    shards_url = storage.join(out, SHARDS_DIR)
    reasons: dict[str, int] = {}
    rows = written = labeled = missing = 0
    entries = []
    writer = _LineWriter(storage.join(out, SKIPPED_NAME))
    try:
        for s in shard_stats(shards_url, shard_count):
            for r in s["skipped_rows"]:
                writer.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
            rows = s["rows"][1]
            written += s["samples"]
            labeled += s["labeled"]
            missing += s.get("caption_missing", 0)
            if s["samples"]:
                entries.append({"name": f"{SHARDS_DIR}/{s['shard']}", "samples": s["samples"], "labeled": s["labeled"],
                                "sha256": s["sha256"], "bytes": s["bytes"], "rows": s["rows"],
                                "sqrt_weight": s.get("sqrt_weight", 0.0)})
    except BaseException:
        writer.abort()
        raise
    writer.close()
    manifest = {**manifest_head,
                "counts": {"rows": rows, "written": written, "labeled": labeled, "unlabeled": written - labeled,
                           "caption_missing": missing, "skipped": dict(sorted(reasons.items()))},
                "classes": len(vocab), "shards": entries}
    write_manifest(out, manifest)
    return json.loads(dumps_json({"schema": 1, **manifest}))
