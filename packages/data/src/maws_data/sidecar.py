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

The shard's stats JSON gets, from `stats_fields`, `label_counts` (samples per label in this shard,
sparse) and `sqrt_weight`: the sum over its samples of 1/sqrt(count of the sample's rarest label),
counts taken from the vocabulary (the build's text pass) -- the per-shard total that square-root
resampling draws shards by without any per-sample array (docs/loader.md).

Memory: O(samples of one shard).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SUFFIX = ".samples.npz"
VERSION = 1


@dataclass(frozen=True)
class ShardSamples:
    key: np.ndarray
    jpg_offset: np.ndarray
    jpg_size: np.ndarray
    size: np.ndarray
    label_ptr: np.ndarray
    labels: np.ndarray

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


def encode(index_text: str, labels: Sequence[Sequence[int]], sizes: Sequence[tuple[int, int]]) -> bytes:
    """The sidecar's bytes for one shard, from its DALI index and each sample's labels and (w, h)."""
    samples = parse_dali_index(index_text)
    if not len(samples) == len(labels) == len(sizes):
        raise ValueError(f"sidecar: {len(samples)} indexed samples, {len(labels)} label lists, {len(sizes)} sizes")
    ptr = np.zeros(len(labels) + 1, np.int64)
    np.cumsum([len(lab) for lab in labels], out=ptr[1:])
    arrays = {
        "version": np.asarray(VERSION, np.int32),
        "key": np.asarray([k.encode("utf-8") for k, _ in samples], dtype="S") if samples else np.zeros(0, "S1"),
        "jpg_offset": np.asarray([m["jpg"][0] for _, m in samples], np.int64),
        "jpg_size": np.asarray([m["jpg"][1] for _, m in samples], np.int64),
        "size": np.asarray(sizes, np.int32).reshape(-1, 2),
        "label_ptr": ptr,
        "labels": np.asarray([c for lab in labels for c in lab], np.int32),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # uncompressed: np.load reads each member without inflating
    return buf.getvalue()


def decode(data: bytes, name: str = "sidecar") -> ShardSamples:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            version = int(z["version"])
            if version != VERSION:
                raise ValueError(f"{name}: sidecar version {version}, this maws reads version {VERSION}")
            return ShardSamples(**{f: z[f] for f in ("key", "jpg_offset", "jpg_size", "size", "label_ptr", "labels")})
    except (KeyError, OSError, EOFError) as e:
        raise ValueError(f"{name}: not a maws sample sidecar ({e})") from e


def sample_weights(labels: Sequence[Sequence[int]], class_counts: Sequence[int]) -> np.ndarray:
    """1/sqrt(count of each sample's rarest label); 0 for an unlabeled sample."""
    counts = np.asarray(class_counts, np.float64)
    return np.array([1.0 / np.sqrt(counts[list(lab)].min()) if len(lab) else 0.0 for lab in labels], np.float64)


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
