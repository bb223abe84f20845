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
Local folders only (a remote build is filtered by the builder's worker on a local copy).

Memory: O(one shard).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from maws_data import sidecar
from maws_data.manifest import atomic_write_json, sha256_file
from maws_data.shards import add_sample, dali_index, shard_stem


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
    present = {k for k, _ in samples}
    removed = [drop[k] for k in sorted(present & set(drop), key=lambda k: drop[k].get("row", 0))]
    if not removed:
        return stats
    if class_counts is None and "sqrt_weight" in stats:
        raise ValueError(f"{stats_path}: has sqrt_weight; pass class_counts (the vocabulary counts) to recompute it")

    kept = [(k, m) for k, m in samples if k not in drop]
    metas = [json.loads(m["json"]) for _, m in kept]
    labels = [meta["labels"] for meta in metas]
    sizes = [(meta["width"], meta["height"]) for meta in metas]
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
            tmp["npz"].write_bytes(sidecar.encode(idx, labels, sizes))
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
    atomic_write_json(stats_path, stats)  # last: the commit marker
    return stats
