"""Clean shards: rewrite one finished shard without some of its samples.

    stats = filter_shard("out/shards", 3, {"key_a": skip_record, ...}, class_counts=vocab.counts)

The builder calls this after the dedup pass (table.Decisions.removed_keys / for_rows) so the final
tars contain no removed sample and plain webdataset / HF datasets / DALI readers see the clean set.
For shard NNNNNN in `shards_dir`:
  shard-NNNNNN.tar           kept samples, same order, members re-added with shards.add_sample
                             (fixed metadata), so the bytes depend only on the kept samples
                             (filtering nothing reproduces the tar byte for byte)
  shard-NNNNNN.idx           shards.dali_index of the new tar
  shard-NNNNNN.samples.npz   sidecar.encode(index, labels, sizes) of the kept samples (from KEY.json)
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

import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from maws_data import sidecar, storage
from maws_data.manifest import read_bytes, sha256_file, write_json
from maws_data.shards import add_sample, dali_index, shard_stem

SHARD_FILES = (".tar", ".idx", sidecar.SUFFIX)  # what a shard has besides its stats, in upload order


def _read_samples(tar_path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """[(KEY, {ext: bytes})] in tar order (webdataset grouping: KEY is the name before the first dot)."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            if not m.isreg():
                continue
            key, _, ext = m.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tf.extractfile(m).read()
    return samples


def filter_shard(shards_dir: str | Path, index: int, drop: Mapping[str, dict], *,
                 class_counts: Sequence[int] | None = None) -> dict:
    """Remove the samples whose KEY is in `drop` from shard `index`; return the new stats.

    drop: KEY -> the skipped.jsonl record of that row ({"row", "key", "reason", "detail"}), added to
    the stats. class_counts: the vocabulary counts, needed when the stats carry sqrt_weight.
    Keys in `drop` that are not in the shard are ignored (so a rerun is a no-op).
    """
    shards = Path(shards_dir)
    stem = shard_stem(index)
    stats_path = shards / f"{stem}.json"
    stats = json.loads(stats_path.read_text(encoding="utf-8"))
    if not stats.get("samples"):
        return stats
    tar_path = shards / f"{stem}.tar"
    samples = _read_samples(tar_path)
    removed = sorted(({**drop[k], "key": json.loads(m["json"]).get("source_key", k)}
                      for k, m in samples if k in drop), key=lambda r: r.get("row", 0))
    if not removed:
        return stats
    if class_counts is None and "sqrt_weight" in stats:
        raise ValueError(f"{stats_path}: has sqrt_weight; pass class_counts (the vocabulary counts) to recompute it")

    kept = [(k, m) for k, m in samples if k not in drop]
    metas = [json.loads(m["json"]) for _, m in kept]
    labels = [meta["labels"] for meta in metas]
    sizes = [(meta["width"], meta["height"]) for meta in metas]
    hashed = bool(metas) and all("sha256" in meta and "phash" in meta for meta in metas)
    hashes = {"sha256": [m["sha256"] for m in metas], "phash": [int(m["phash"], 16) for m in metas]} if hashed else {}
    tmp = {ext: shards / f".{stem}.{ext}.filter.tmp" for ext in ("tar", "idx", "npz")}
    try:
        if kept:
            with open(tmp["tar"], "wb") as f:
                with tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                    for key, members in kept:
                        add_sample(tar, key, members)
                f.flush()
                os.fsync(f.fileno())
            idx = dali_index(tmp["tar"])
            tmp["idx"].write_text(idx, encoding="utf-8")
            tmp["npz"].write_bytes(sidecar.encode(idx, labels, sizes, **hashes))
            digest, size = sha256_file(tmp["tar"]), tmp["tar"].stat().st_size
            for ext, final in (("tar", tar_path), ("idx", shards / f"{stem}.idx"),
                               ("npz", shards / f"{stem}{sidecar.SUFFIX}")):
                os.replace(tmp[ext], final)  # the tar first: an index never names a tar that is not there
        else:
            for final in (tar_path, shards / f"{stem}.idx", shards / f"{stem}{sidecar.SUFFIX}"):
                final.unlink(missing_ok=True)
            digest, size = None, 0
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)

    skipped_rows = sorted([*stats.get("skipped_rows", []), *removed], key=lambda s: s["row"])
    reasons: dict[str, int] = {}
    for s in skipped_rows:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    stats.update({"shard": tar_path.name if kept else None, "samples": len(kept),
                  "labeled": sum(bool(lab) for lab in labels), "sha256": digest, "bytes": size,
                  "skipped": dict(sorted(reasons.items())), "skipped_rows": skipped_rows,
                  **sidecar.stats_fields(labels, class_counts)})
    if "caption_missing" in stats:
        stats["caption_missing"] = sum(meta.get("caption") is None for meta in metas)
    write_json(str(stats_path), stats, compact=True)  # last: the commit marker (as shards.write_shard writes it)
    return stats


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
        fs.get_file(f"{base}/{stem}.tar", str(local / f"{stem}.tar"))
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
