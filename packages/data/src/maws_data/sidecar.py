"""The per-shard sample sidecar `shard-NNNNNN.samples.npz`: what the loader needs of every sample of
one shard, as numpy arrays, so that no reader has to open a single KEY.json.

The builder writes it beside the tar and its DALI index, before the stats JSON (the shard's commit
marker); the loader reads it only for the shards that one of its workers reads. Format: an
uncompressed `.npz` (numpy's zip of `.npy` files), readable with `np.load` and nothing else:

    key         bytes  (n,)     S<max len>: the sample's KEY (the tar member name before the first dot)
    jpg_offset  int64  (n,)     byte offset of KEY.jpg's data in the tar
    jpg_size    int64  (n,)     its size in bytes
    size        int32  (n, 2)   stored image width, height
    label_ptr   int64  (n+1,)   CSR: labels of sample i are labels[label_ptr[i]:label_ptr[i+1]]
    labels      int32  (m,)     vocabulary indices, caption order (as in KEY.json)
    sha256      uint8  (n, 32)  version 2: sha256 of each sample's source bytes (KEY.json "sha256")
    phash       uint64 (n,)     version 2: 64-bit perceptual hash of the stored image (KEY.json "phash")

Version 1 files (builds from before the dedup hashes) have no sha256/phash and are still read.

The shard's stats JSON gets, from `stats_fields`, `label_counts` (samples per label in this shard,
sparse) and `sqrt_weight`: the sum over its samples of 1/sqrt(count of the sample's rarest label),
counts taken from the vocabulary (the build's text pass) -- the per-shard total that square-root
resampling draws shards by without any per-sample array (docs/loader.md).

`upgrade_build` adds all of this to a build made before sidecars (`maws-data upgrade BUILD`).

Memory: O(samples of one shard).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUFFIX = ".samples.npz"
VERSION = 2
READS = (1, 2)  # versions `decode` accepts


@dataclass(frozen=True)
class ShardSamples:
    key: np.ndarray
    jpg_offset: np.ndarray
    jpg_size: np.ndarray
    size: np.ndarray
    label_ptr: np.ndarray
    labels: np.ndarray
    sha256: np.ndarray | None = None  # (n, 32) uint8; None in a version 1 sidecar
    phash: np.ndarray | None = None  # (n,) uint64

    def __len__(self) -> int:
        return len(self.jpg_offset)

    def labels_of(self, i: int) -> np.ndarray:
        return self.labels[self.label_ptr[i]:self.label_ptr[i + 1]]


def parse_dali_index(text: str, name: str = "index") -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Parse a DALI webdataset index (v1.2): [(key, {ext: (data_offset, size)})] in tar order."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1."):
        raise ValueError(f"{name}: not a DALI webdataset index (first line {lines[:1]})")
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if len(parts) % 4:
            raise ValueError(f"{name}:{lineno}: expected groups of 'ext offset size name', got {line!r}")
        members = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}
        samples.append((parts[3].split(".", 1)[0], members))
    if len(samples) != int(head[1]):
        raise ValueError(f"{name}: header says {head[1]} samples, found {len(samples)}")
    return samples


def encode(index_text: str, labels: Sequence[Sequence[int]], sizes: Sequence[tuple[int, int]], *,
           sha256: Sequence[str] | None = None, phash: Sequence[int] | None = None) -> bytes:
    """The sidecar's bytes for one shard, from its DALI index and each sample's labels and (w, h), and
    its dedup hashes (sha256 hex, phash int) when known (version 2; without them, version 1)."""
    samples = parse_dali_index(index_text)
    if not len(samples) == len(labels) == len(sizes):
        raise ValueError(f"sidecar: {len(samples)} indexed samples, {len(labels)} label lists, {len(sizes)} sizes")
    if (sha256 is None) != (phash is None) or (sha256 is not None and not len(sha256) == len(phash) == len(labels)):
        raise ValueError("sidecar: give sha256 and phash together, one per sample")
    ptr = np.zeros(len(labels) + 1, np.int64)
    np.cumsum([len(lab) for lab in labels], out=ptr[1:])
    arrays = {
        "version": np.asarray(VERSION if sha256 is not None else 1, np.int32),
        "key": np.asarray([k.encode("utf-8") for k, _ in samples], dtype="S") if samples else np.zeros(0, "S1"),
        "jpg_offset": np.asarray([m["jpg"][0] for _, m in samples], np.int64),
        "jpg_size": np.asarray([m["jpg"][1] for _, m in samples], np.int64),
        "size": np.asarray(sizes, np.int32).reshape(-1, 2),
        "label_ptr": ptr,
        "labels": np.asarray([c for lab in labels for c in lab], np.int32),
    }
    if sha256 is not None:
        arrays["sha256"] = np.frombuffer(b"".join(bytes.fromhex(h) for h in sha256), np.uint8).reshape(-1, 32)
        arrays["phash"] = np.array([int(h) for h in phash], np.uint64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # uncompressed: np.load reads each member without inflating
    return buf.getvalue()


def decode(data: bytes, name: str = "sidecar") -> ShardSamples:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            version = int(z["version"])
            if version not in READS:
                raise ValueError(f"{name}: sidecar version {version}, this maws reads versions {READS}")
            hashes = {f: z[f] for f in ("sha256", "phash")} if version >= 2 else {}
            return ShardSamples(**{f: z[f] for f in ("key", "jpg_offset", "jpg_size", "size", "label_ptr", "labels")},
                                **hashes)
    except (KeyError, OSError, EOFError) as e:
        raise ValueError(f"{name}: not a maws sample sidecar ({e})") from e


def sample_weights(labels: Sequence[Sequence[int]], class_counts: Sequence[int]) -> np.ndarray:
    """1/sqrt(count of each sample's rarest label); 0 for an unlabeled sample."""
    ptr = np.zeros(len(labels) + 1, np.int64)
    np.cumsum([len(lab) for lab in labels], out=ptr[1:])
    flat = np.asarray([c for lab in labels for c in lab], np.int64)
    return sample_weights_csr(ptr, flat, class_counts)


def sample_weights_csr(label_ptr: np.ndarray, labels: np.ndarray, class_counts: Sequence[int]) -> np.ndarray:
    """`sample_weights` over CSR labels (a sidecar's label_ptr/labels), vectorised: no per-sample Python."""
    counts = np.asarray(class_counts, np.float64)
    n = len(label_ptr) - 1
    out = np.zeros(n, np.float64)
    has = np.diff(label_ptr) > 0
    if has.any():
        per_label = counts[labels[: label_ptr[-1]]]
        # minimum per sample: reduceat over the starts of the non-empty rows (empty rows would repeat a value)
        rarest = np.minimum.reduceat(per_label, label_ptr[:-1][has])
        out[has] = 1.0 / np.sqrt(rarest)
    return out


def stats_fields(labels: Sequence[Sequence[int]], class_counts: Sequence[int] | None) -> dict:
    """Per-shard label statistics for the stats JSON (see module docstring)."""
    hist: dict[int, int] = {}
    for lab in labels:
        for c in lab:
            hist[int(c)] = hist.get(int(c), 0) + 1
    fields: dict = {"label_counts": {str(c): n for c, n in sorted(hist.items())}}
    if class_counts is not None and len(class_counts):
        fields["sqrt_weight"] = float(sample_weights(labels, class_counts).sum())
    return fields


def upgrade_build(build: str | Path, *, log=print) -> int:
    """Add sidecars, stats `label_counts`/`sqrt_weight` and manifest `sqrt_weight` to a build made before
    sidecars existed, from each shard's .idx and its samples' KEY.json (one read per sample, once).
    Returns the number of shards upgraded; shards that already have a sidecar are left as they are."""
    import json

    from maws_data.manifest import atomic_write_bytes, atomic_write_json, read_manifest, write_manifest
    from maws_data.vocab import Vocabulary

    build = Path(build)
    manifest = read_manifest(build)
    counts = Vocabulary.load(build).counts
    done = 0
    for entry in manifest["shards"]:
        tar = build / entry["name"]
        stem = tar.with_suffix("")
        stats_path, out = stem.with_suffix(".json"), Path(str(stem) + SUFFIX)
        index_text = stem.with_suffix(".idx").read_text()
        labels, sizes, sha256, phash = [], [], [], []
        with open(tar, "rb") as f:
            for key, members in parse_dali_index(index_text, str(stem.with_suffix(".idx"))):
                if "json" not in members:
                    raise ValueError(f"{tar}: sample {key} has no .json member; rebuild this shard")
                off, size = members["json"]
                f.seek(off)
                meta = json.loads(f.read(size))
                labels.append([int(c) for c in meta["labels"]])
                sizes.append((int(meta["width"]), int(meta["height"])))
                if "sha256" in meta and "phash" in meta:  # builds since the dedup hashes: a version 2 sidecar
                    sha256.append(meta["sha256"])
                    phash.append(int(meta["phash"], 16))
        stats = json.loads(stats_path.read_text())
        if not out.exists():
            hashes = {"sha256": sha256, "phash": phash} if sha256 and len(sha256) == len(labels) else {}
            atomic_write_bytes(out, encode(index_text, labels, sizes, **hashes))
            done += 1
        stats.update(stats_fields(labels, counts))
        atomic_write_json(stats_path, stats)
        entry["sqrt_weight"] = stats.get("sqrt_weight", 0.0)
        log(f"{entry['name']}: {len(labels)} samples")
    manifest.pop("schema", None)
    write_manifest(build, manifest)
    return done
