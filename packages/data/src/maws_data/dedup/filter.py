"""Clean shards: rewrite one finished shard without some of its samples.

    stats = filter_shard("out/shards", 3, {"key_a": skip_record, ...}, class_counts=vocab.counts)

The builder calls this after the dedup pass (table.Decisions.removed_keys / for_rows) so the final
tars contain no removed sample and plain webdataset / HF datasets / DALI readers see the clean set.
For shard NNNNNN in `shards_dir`:
  shard-NNNNNN.tar           the kept samples' bytes, copied in order (headers carry fixed metadata
                             and no offsets), + tarfile's trailer: the tar write_shard would have
                             written for the kept rows alone, byte for byte
  shard-NNNNNN.idx           the old DALI index without the removed samples, offsets shifted
                             (= shards.dali_index of the new tar)
  shard-NNNNNN.samples.npz   the old sidecar's kept rows (sidecar.encode: the same bytes as the builder's)
  shard-NNNNNN.json          stats: samples, labeled, caption_missing, sha256, bytes, label_counts,
                             sqrt_weight recomputed; the removed rows added to "skipped" and
                             "skipped_rows" (so finish.py's skipped.jsonl and manifest counts include them)
Everything is written under a temporary name first; then tar, idx and sidecar are renamed into
place and the stats JSON goes last (the commit marker). A crash in between leaves stats whose
sha256 no longer matches the tar, which shards.completed_stats treats as "not done".
A shard whose samples are all removed loses its tar, idx and sidecar; its stats say "shard": null.
A removed row's record names its source key (KEY.json "source_key"), like every other skip record.
`filter_shard_at` does the same for a shard on object storage, through a local copy: the new tar,
idx and sidecar are uploaded (or deleted), then the stats; a crash in between leaves stats whose
size no longer matches the tar, which completed_stats also treats as "not done".

Memory: O(one shard).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from maws_data import sidecar, storage
from maws_data.manifest import read_bytes, write_json
from maws_data.shards import IDX_VERSION, shard_stem, tar_trailer

SHARD_FILES = (".tar", ".idx", sidecar.SUFFIX)  # what a shard has besides its stats, in upload order


def sample_spans(entries: list[tuple[str, dict[str, tuple[int, int]]]]) -> list[tuple[int, int]]:
    """Each sample's [start, end) bytes in its tar, from the DALI index: its members' 512-byte USTAR
    headers and padded data are contiguous (the builder writes one sample's members together)."""
    spans = []
    for key, members in entries:
        start = min(off for off, _ in members.values()) - tarfile.BLOCKSIZE
        end = max(off + _padded(size) for off, size in members.values())
        if spans and spans[-1][1] != start:
            raise ValueError(f"sample {key}: its members do not follow the previous sample's (not a maws shard?)")
        spans.append((start, end))
    return spans


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def filter_shard(shards_dir: str | Path, index: int, drop: Mapping[str, dict], *,
                 class_counts: Sequence[int] | None = None) -> dict:
    """Remove the samples whose KEY is in `drop` from shard `index`; return the new stats.

    drop: KEY -> the skipped.jsonl record of that row ({"row", "key", "reason", "detail"}), added to
    the stats. class_counts: the vocabulary counts, needed when the stats carry sqrt_weight.
    Keys in `drop` that are not in the shard are ignored (so a rerun is a no-op).

    The kept samples' tar bytes are copied as they are (USTAR headers hold no offsets, so a sample's
    bytes do not depend on what precedes it), and the index and sidecar are the old ones without the
    removed rows, offsets shifted: no tar member or KEY.json of a kept sample is parsed. Only the
    removed samples' KEY.json are read (their source key, and whether their caption was null).
    """
    shards = Path(shards_dir)
    stem = shard_stem(index)
    stats_path = shards / f"{stem}.json"
    stats = json.loads(stats_path.read_text(encoding="utf-8"))
    if not stats.get("samples"):
        return stats
    tar_path, idx_path, side_path = (shards / f"{stem}{suffix}" for suffix in SHARD_FILES)
    entries = sidecar.parse_dali_index(idx_path.read_text(encoding="utf-8"), str(idx_path))
    gone = [i for i, (key, _) in enumerate(entries) if key in drop]
    if not gone:
        return stats
    if class_counts is None and "sqrt_weight" in stats:
        raise ValueError(f"{stats_path}: has sqrt_weight; pass class_counts (the vocabulary counts) to recompute it")
    side = sidecar.decode(side_path.read_bytes(), str(side_path))
    spans = sample_spans(entries)
    gone_set = set(gone)
    kept = [i for i in range(len(entries)) if i not in gone_set]
    removed, null_captions = [], 0
    tmp = {suffix: shards / f".{stem}{suffix}.filter.tmp" for suffix in SHARD_FILES}
    try:
        with open(tar_path, "rb") as src:
            for i in gone:
                key, members = entries[i]
                off, size = members["json"]
                src.seek(off)
                meta = json.loads(src.read(size))
                null_captions += meta.get("caption") is None
                removed.append({**drop[key], "key": meta.get("source_key", key)})
            digest, length, shifts = _copy_samples(src, tmp[".tar"], [spans[i] for i in kept]) if kept else (None, 0, [])
        if kept:
            lines = [" ".join(f"{ext} {off - shift} {size} {entries[i][0]}.{ext}"
                              for ext, (off, size) in entries[i][1].items()) for i, shift in zip(kept, shifts)]
            idx = f"{IDX_VERSION} {len(kept)}\n" + "".join(line + "\n" for line in lines)
            tmp[".idx"].write_text(idx, encoding="utf-8")
            hashes = ({"sha256": [bytes(side.sha256[i]).hex() for i in kept], "phash": side.phash[kept].tolist()}
                      if side.sha256 is not None else {})
            labels = [side.labels_of(i).tolist() for i in kept]
            tmp[sidecar.SUFFIX].write_bytes(sidecar.encode(idx, labels, side.size[kept].tolist(), **hashes))
            for suffix, final in zip(SHARD_FILES, (tar_path, idx_path, side_path)):
                os.replace(tmp[suffix], final)  # the tar first: an index never names a tar that is not there
        else:
            labels = []
            for final in (tar_path, idx_path, side_path):
                final.unlink(missing_ok=True)
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)

    removed.sort(key=lambda r: r.get("row", 0))
    skipped_rows = sorted([*stats.get("skipped_rows", []), *removed], key=lambda s: s["row"])
    reasons: dict[str, int] = {}
    for s in skipped_rows:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    stats.update({"shard": tar_path.name if kept else None, "samples": len(kept),
                  "labeled": sum(bool(lab) for lab in labels), "sha256": digest, "bytes": length,
                  "skipped": dict(sorted(reasons.items())), "skipped_rows": skipped_rows,
                  **sidecar.stats_fields(labels, class_counts)})
    if "caption_missing" in stats:
        stats["caption_missing"] -= null_captions
    write_json(str(stats_path), stats, compact=True)  # last: the commit marker (as shards.write_shard writes it)
    return stats


def _copy_samples(src, dest: Path, spans: list[tuple[int, int]]) -> tuple[str, int, list[int]]:
    """Copy the byte spans of `src` to `dest` + the tar trailer, durably; (sha256, length, each span's shift)."""
    h = hashlib.sha256()
    shifts, length = [], 0
    with open(dest, "wb") as out:
        for start, end in spans:
            src.seek(start)
            data = src.read(end - start)
            shifts.append(start - length)
            out.write(data)
            h.update(data)
            length += len(data)
        tail = tar_trailer(length)
        out.write(tail)
        h.update(tail)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest(), length + len(tail), shifts


def filter_shard_at(shards_url: str, index: int, drop: Mapping[str, dict], *,
                    class_counts: Sequence[int] | None = None) -> dict:
    """`filter_shard` for a local folder or an object-storage prefix (through a local copy)."""
    if not storage.is_remote(shards_url):
        return filter_shard(shards_url, index, drop, class_counts=class_counts)
    stem = shard_stem(index)
    fs, base = storage.filesystem(shards_url)
    local = Path(tempfile.mkdtemp(prefix="maws-filter-"))
    try:
        stats = json.loads(read_bytes(storage.join(shards_url, f"{stem}.json")))
        if not stats.get("samples"):
            return stats
        (local / f"{stem}.json").write_bytes(json.dumps(stats).encode())
        fs.get([f"{base}/{stem}{suffix}" for suffix in SHARD_FILES],
               [str(local / f"{stem}{suffix}") for suffix in SHARD_FILES])
        new = filter_shard(local, index, drop, class_counts=class_counts)
        if new["sha256"] == stats["sha256"]:
            return new  # nothing of `drop` was in the shard (a rerun)
        for suffix in SHARD_FILES:  # the tar first, the stats last
            path = local / f"{stem}{suffix}"
            if path.exists():
                fs.put_file(str(path), f"{base}/{stem}{suffix}")
            elif fs.exists(f"{base}/{stem}{suffix}"):
                fs.rm_file(f"{base}/{stem}{suffix}")
        fs.put_file(str(local / f"{stem}.json"), f"{base}/{stem}.json")
        return new
    finally:
        shutil.rmtree(local, ignore_errors=True)
