"""The shard index: what the loader knows about a build before it reads a sample.

Read at startup, per rank: the manifest's `shards[]` (name, samples, labeled, bytes, sha256,
sqrt_weight) and vocabulary.tsv (number of classes, per-class counts for sqrt weights), or, for a
glob / list / shards folder without a manifest, each shard's stats JSON. Local tars are stat'ed (a
missing tar is an error naming it; a tar shorter than recorded is a truncated shard, see below);
remote ones are not (a missing object fails when it is first read, naming it).

Per-sample data (offsets, sizes, keys, labels) is in each shard's sidecar (`maws_data.sidecar`),
which `read_sidecar` loads only when a worker reads that shard.

A truncated local tar (shorter than the recorded `bytes`) is the one case where startup reads a
sidecar: the samples whose JPEG ends past the end of the file are excluded (counted as
"truncated_shard") and the shard's counts are cut to the samples that remain (a prefix, tar order).

Builds from before sidecars (manifest shards without `sqrt_weight`, or no `.samples.npz`) fail with
a message that says to run `maws-data upgrade BUILD`.

Memory: O(#shards) (a few numpy arrays and the shard names), O(#classes) for the class counts.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import posixpath
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from maws_data import sidecar, storage

UPGRADE_HINT = "this build predates the per-shard sample sidecars; run `maws-data upgrade {build}` once to add them"


@dataclass
class ShardIndex:
    """Every shard of a build, in dataset (manifest) order; shard s is row s of each array."""
    tars: list[str]              # path or URL of each tar
    names: list[str]             # its file name (shown with bad samples)
    samples: np.ndarray          # int64 (S,) usable samples (all rows, or a prefix of a truncated tar)
    labeled: np.ndarray          # int64 (S,) usable samples with >= 1 label
    sqrt_weight: np.ndarray      # float64 (S,) sum of the usable samples' sqrt weights (sidecar.sample_weights)
    first: np.ndarray            # int64 (S,) global id of the shard's row 0 (dataset order): crops, identity
    class_counts: np.ndarray     # int64 (C,) vocabulary counts (vocabulary.tsv), the sqrt weights' n(class)
    fingerprint: str             # of the shard list (names, counts, bytes, sha256) and the vocabulary
    remote: bool = False
    build: str | None = None     # the build folder, when there is one
    excluded: list[dict] = field(default_factory=list)  # samples of truncated tars: {"shard", "key", "reason", "detail"}

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    def __len__(self) -> int:
        return len(self.tars)

    def sidecar_url(self, s: int) -> str:
        tar = self.tars[s]
        return (tar.removesuffix(".tar")) + sidecar.SUFFIX


RETRIES = 5  # attempts per remote read (sidecars, manifest, stats; reader.py uses it for JPEG ranges too)


def retrying(call, what: str):
    """call(), retried with backoff when a remote read fails (dropped connection, timeout, 5xx); a missing
    file is not retried."""
    for attempt in range(RETRIES):
        try:
            return call()
        except FileNotFoundError:
            raise
        except Exception as e:  # aiohttp, botocore, OSError: whatever a dropped link raises
            if attempt == RETRIES - 1:
                raise OSError(f"reading {what} failed {RETRIES} times: {e}") from e
            retrying.count += 1
            time.sleep(0.1 * 2 ** attempt)


retrying.count = 0  # retried reads in this process (tests, diagnostics)


def _read_bytes(url: str) -> bytes:
    fs, path = storage.filesystem(url)
    return retrying(lambda: fs.cat_file(path), url) if storage.is_remote(url) else fs.cat_file(path)


def _exists(url: str) -> bool:
    fs, path = storage.filesystem(url)
    return fs.exists(path)


def read_sidecar(index: ShardIndex, s: int) -> sidecar.ShardSamples:
    """Shard s's per-sample arrays (one read of its .samples.npz)."""
    url = index.sidecar_url(s)
    try:
        data = _read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} is missing: " + UPGRADE_HINT.format(build=index.build or "BUILD")) from None
    samples = sidecar.decode(data, url)
    if len(samples) < index.samples[s]:
        raise ValueError(f"{url}: {len(samples)} samples, the index says {index.samples[s]}")
    return samples


def _vocabulary_counts(build: str | None) -> tuple[np.ndarray, bytes]:
    """Per-class counts (vocabulary.tsv `count`, index order) and the file's bytes; empty without a vocabulary."""
    if build is None:
        return np.zeros(0, np.int64), b""
    url = storage.join(build, "vocabulary.tsv")
    try:
        text = _read_bytes(url)
    except FileNotFoundError:
        return np.zeros(0, np.int64), b""
    # (csv, not polars: importing polars alone took 0.6 s of a 1.4 s startup)
    rows = list(csv.DictReader(io.StringIO(text.decode("utf-8")), delimiter="\t"))
    if [int(r["index"]) for r in rows] != list(range(len(rows))):
        raise ValueError(f"{url}: column 'index' must be 0..{len(rows) - 1} in order")
    return np.array([int(r["count"]) for r in rows], np.int64), text


def _from_manifest(build: str) -> tuple[list[str], list[dict], bytes]:
    """(tars, the manifest's shard entries, the manifest's bytes)."""
    url = storage.join(build, "manifest.json")
    try:
        raw = _read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} is missing: the build in {build} is incomplete "
                                "(the builder writes manifest.json last)") from None
    entries = json.loads(raw)["shards"]
    if entries and "sqrt_weight" not in entries[0]:
        raise ValueError(f"{url}: " + UPGRADE_HINT.format(build=build))
    # names are relative to the build dir ("shards/shard-000000.tar"); bare names live in shards/
    root = storage.join(build, "")  # one join, then string concatenation: 20,000 joins cost 0.13 s
    tars = [root + (e["name"] if "/" in e["name"] else "shards/" + e["name"]) for e in entries]
    return tars, entries, raw


def _from_stats(tars: list[str], build: str | None) -> list[dict]:
    """Per-shard entries from each tar's stats JSON (no manifest: a glob, a list or a shards folder)."""
    entries = []
    for tar in tars:
        url = (tar.removesuffix(".tar")) + ".json"
        try:
            stats = json.loads(_read_bytes(url))
        except FileNotFoundError:
            raise FileNotFoundError(f"{url} is missing: every shard needs its stats JSON (the builder writes "
                                    "it last, so the shard may be unfinished)") from None
        if "sqrt_weight" not in stats and stats.get("labeled"):
            raise ValueError(f"{url}: " + UPGRADE_HINT.format(build=build or "BUILD"))
        entries.append(stats)
    return entries


def resolve(spec: str | Sequence[str]) -> tuple[list[str], str | None, list[dict] | None, bytes]:
    """(tars in order, the build folder holding vocabulary.tsv or None, manifest entries or None, the
    manifest's bytes or b"")."""
    if not isinstance(spec, str):
        tars = [str(s) for s in spec]
    elif _exists(storage.join(spec, "manifest.json")) or (not storage.is_remote(spec) and os.path.isdir(
            os.path.join(spec, "shards"))):  # a local build dir without its manifest: unfinished, said so
        tars, entries, raw = _from_manifest(spec)
        return tars, spec, entries, raw
    elif storage.is_remote(spec):
        raise FileNotFoundError(f"{spec}: no manifest.json (a remote build is read from its manifest)")
    elif os.path.isdir(spec):
        tars = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        tars = sorted(glob.glob(spec))
    if not tars:
        raise FileNotFoundError(f"no shard tars found for {spec!r}")
    dirname = posixpath.dirname if storage.is_remote(tars[0]) else os.path.dirname
    parent = dirname(tars[0])
    candidates = [dirname(parent), parent]  # the build dir above shards/, or the tars' own folder
    build = next((d for d in candidates if _exists(storage.join(d, "vocabulary.tsv"))), None)
    return tars, build, None, b""


def _truncated(index_tar: str, name: str, recorded: int, entry_samples: int, class_counts: np.ndarray,
               url: str) -> tuple[int, int, float, list[dict]]:
    """(samples, labeled, sqrt_weight, excluded) of a local tar cut short: the samples before the cut."""
    actual = os.path.getsize(index_tar)
    samples = sidecar.decode(_read_bytes(url), url)
    ends = samples.jpg_offset + samples.jpg_size
    past = ends > actual  # offsets grow in tar order: the samples past the cut are a tail
    keep = int(np.argmax(past)) if past.any() else len(samples)
    n_labels = np.diff(samples.label_ptr)[:keep]
    w = sidecar.sample_weights_csr(samples.label_ptr[:keep + 1], samples.labels, class_counts) \
        if len(class_counts) else np.zeros(keep)
    excluded = [{"shard": name, "key": k.decode(), "reason": "truncated_shard",
                 "detail": f"tar is {actual} bytes, {recorded} recorded"} for k in samples.key[keep:entry_samples]]
    return keep, int((n_labels > 0).sum()), float(w.sum()), excluded


def open_index(spec: str | Sequence[str]) -> ShardIndex:
    """Index the shards named by `spec` (a build folder or URL, a shards/ folder, a glob, a list of tars)."""
    tars, build, entries, manifest_bytes = resolve(spec)
    class_counts, vocab_bytes = _vocabulary_counts(build)
    if entries is None:
        entries = _from_stats(tars, build)
    remote = storage.is_remote(tars[0])
    names = [t.rsplit("/", 1)[-1] for t in tars]
    samples = np.array([e["samples"] for e in entries], np.int64)
    labeled = np.array([e["labeled"] for e in entries], np.int64)
    weight = np.array([e.get("sqrt_weight", 0.0) for e in entries], np.float64)
    first = np.concatenate([[0], np.cumsum(samples)[:-1]]).astype(np.int64)
    # A rebuild with other images or another vocabulary keeps the shard names and often the counts; the
    # manifest (shard bytes and sha256) or the stats, and the vocabulary text, tell it apart.
    digest = hashlib.sha256(vocab_bytes)
    digest.update(manifest_bytes or json.dumps([[n, e["samples"], e.get("bytes"), e.get("sha256")]
                                                for n, e in zip(names, entries)], separators=(",", ":")).encode())
    index = ShardIndex(tars=tars, names=names, samples=samples, labeled=labeled, sqrt_weight=weight, first=first,
                       class_counts=class_counts, fingerprint=digest.hexdigest()[:16], remote=remote, build=build)
    if not remote:
        _check_local(index, entries)
    elif not _exists(index.sidecar_url(0)):
        raise FileNotFoundError(f"{index.sidecar_url(0)} is missing: " + UPGRADE_HINT.format(build=build or "BUILD"))
    return index


def _check_local(index: ShardIndex, entries: list[dict]) -> None:
    """Every tar is there (one stat each); a tar shorter than recorded is cut to its complete samples."""
    for s, (tar, e) in enumerate(zip(index.tars, entries)):
        try:
            size = os.path.getsize(tar)
        except FileNotFoundError:
            raise FileNotFoundError(f"shard {tar} listed but missing") from None
        if s == 0 and not os.path.exists(index.sidecar_url(0)):
            raise FileNotFoundError(f"{index.sidecar_url(0)} is missing: "
                                    + UPGRADE_HINT.format(build=index.build or "BUILD"))
        if e.get("bytes") is not None and size < e["bytes"]:
            n, lab, w, excluded = _truncated(tar, index.names[s], e["bytes"], e["samples"], index.class_counts,
                                             index.sidecar_url(s))
            index.samples[s], index.labeled[s], index.sqrt_weight[s] = n, lab, w
            index.excluded += excluded
