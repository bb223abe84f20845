"""Exact and near deduplication of a whole build in bounded memory: unit files -> spills -> partitions -> decisions.

The builder writes one *unit file* per work unit (a shard, or several) with the hashes of the rows it
wrote: `write_unit(table_dir, unit, rows=, keys=, sha256=, phash=)`. Then `dedup(table_dir, ...)`:

  1. spill (map, per group of consecutive units, ~`spill_records` records each): for each row, one *exact record*
     (the first 128 bits of its sha256, row) and, for `near`, one *near record* per multi-index table
     (mih.py: gkey = a 64-bit mix of (table, hash & table mask), phash, row). Records are sorted by
     sha prefix / gkey, and partition p is the p-th of P equal ranges of that 64-bit value, so it is
     one contiguous run of each spill (.npy + .off.npy offsets).
  2. reduce (per partition): read that partition's slice of every spill (one seek + read each), sort.
     Exact: records with equal sha prefix form a group; the first row keeps, the others are
     `duplicate_image` of it. Near: records with equal gkey form a group; every pair in a
     group is verified by Hamming distance, and pairs within the threshold are kept. By the
     pigeonhole argument in mih.py this finds every pair of rows within the threshold (rows that
     repeat an earlier row's phash get one alias pair instead, see reduce_near).
  3. resolve (row order): rows removed as exact duplicates first; then each remaining row, in row
     order, is `near_duplicate` when it is within the threshold of an earlier row that is kept, and
     its detail names the earliest such row. A chain a~b~c with a, c farther apart keeps a and c.
  4. name: the keys of the removed and the kept rows, read back from the unit files.
Output `table_dir/decisions.npz` (row-sorted: row, reason, kept_row, distance, key, kept_key) and a
`Decisions` object that hands the builder each shard's removed rows as skipped.jsonl records.

Every step is a function of the set of (row, key, sha256, phash) only: sorting by row inside every
group makes the result identical for any split into units, any grouping into spills, any number of
partitions, processes or nodes.

Memory: spill O(spill_records); reduce O(records of one partition) -- N * tables / P, so
flat when P grows with N (`partitions_for`); resolve O(near pairs + removed rows), which grows with
the number of duplicates, plus a bitmap of max row / 8 bytes (rows are the builder's dense row
numbers). 128 bits of sha256 stand for the whole digest (a collision
among 10^9 rows has probability ~1e-21).
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from maws_data.dedup.mih import plan_blocks, table_masks
from maws_data.manifest import TMP_SUFFIX, atomic_write_bytes

DUPLICATE = "duplicate_image"
NEAR = "near_duplicate"
REASONS = ("", DUPLICATE, NEAR)  # reason codes 1, 2 in decisions.npz
NEAR_THRESHOLD = 2  # default Hamming threshold of `near` (docs/dedup.md: precision/recall and cost)
RECORDS_PER_PARTITION = 1 << 21  # ~55 MB of records per reduce task (peak ~4x that while sorting)
RECORDS_PER_SPILL = 1 << 21  # the same bound for a spill task
RESOLVE_CHUNK = 1 << 18  # rows whose candidate pairs are Python objects at once in `resolve`
UNITS, SPILLS, DECISIONS = "units", "spills", "decisions.npz"
_UNIT_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")

# Spill records are (n, 3) uint64 arrays (a row gather of 24 contiguous bytes is ~5x faster than
# numpy's structured-array gather): exact [sha h0, sha h1, row], near [gkey, phash, row].
# gkey = mix(table salt ^ (phash & table mask)): one 64-bit sort key per (table, key). Two different
# (table, key) may share a gkey (probability 2^-64 per pair); that only adds a candidate pair,
# which the Hamming check then rejects, so results stay exact.
# Near records carry their table id in the row column's top 16 bits (rows < 2^48), so a pair that
# collides in several tables is emitted only by the first of them: each pair once, whatever k.
H0, H1, GKEY, PHASH, ROW = 0, 1, 0, 1, 2
ROW_BITS = 48
ROW_MASK = np.uint64((1 << ROW_BITS) - 1)


# --------------------------------------------------------------------------- unit files (written by the builder)


def write_unit(table_dir: str | Path, unit: str, *, rows: Sequence[int] | np.ndarray, keys: Sequence[str] | np.ndarray,
               sha256: Sequence[str] | np.ndarray, phash: Sequence[int] | np.ndarray) -> Path:
    """Record the hashes of one work unit's rows (atomically): `table_dir/units/<unit>.npz`.

    rows: the builder's input row numbers (unique in the build); keys: the names to report;
    sha256: hex digests of the source bytes (or their first 16 bytes as an (n, 2) big-endian uint64
    array); phash: 64-bit perceptual hashes. Write only rows that
    survived the other checks (decode errors, eval contamination): a row in no unit is never kept.
    """
    data = unit_bytes(unit, rows=rows, keys=keys, sha256=sha256, phash=phash)
    path = Path(table_dir) / UNITS / f"{unit}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def unit_bytes(unit: str, *, rows: Sequence[int] | np.ndarray, keys: Sequence[str] | np.ndarray,
               sha256: Sequence[str] | np.ndarray, phash: Sequence[int] | np.ndarray) -> bytes:
    """The bytes of `write_unit`'s file (for a builder that stores them itself, e.g. on object storage)."""
    if not _UNIT_NAME.match(unit):
        raise ValueError(f"unit name {unit!r}: use letters, digits, '-', '_' and '.'")
    n = len(rows)
    if not n == len(keys) == len(sha256) == len(phash):
        raise ValueError(f"unit {unit}: {n} rows, {len(keys)} keys, {len(sha256)} sha256, {len(phash)} phash")
    if len(np.unique(np.asarray(rows, np.int64))) != n:
        raise ValueError(f"unit {unit}: row numbers repeat (each row must be written once, in one unit)")
    if isinstance(sha256, np.ndarray) and sha256.dtype.kind == "u":
        digests = sha256.astype(np.uint64).reshape(n, 2)
    else:
        digests = np.frombuffer(b"".join(bytes.fromhex(s)[:16] for s in sha256), dtype=">u8").reshape(n, 2)
    if isinstance(keys, np.ndarray) and keys.dtype.kind == "S":
        key_arr = keys
    else:
        key_arr = np.asarray([k.encode() for k in keys], dtype="S") if n else np.zeros(0, "S1")
    arrays = {"rows": np.asarray(rows, np.int64).reshape(n), "keys": key_arr, "sha": digests.astype("<u8"),
              "phash": np.asarray(phash, np.uint64) if isinstance(phash, np.ndarray)
              else np.array([int(h) for h in phash], np.uint64)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_unit(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in ("rows", "keys", "sha", "phash")}


def unit_paths(table_dir: str | Path) -> list[Path]:
    return sorted((Path(table_dir) / UNITS).glob("*.npz"))


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    mode: Literal["exact", "near"]
    threshold: int
    partitions: int
    blocks: int  # multi-index blocks (near only)

    @property
    def masks(self) -> np.ndarray:
        return table_masks(self.threshold, self.blocks)


def partitions_for(records: int, per_partition: int = RECORDS_PER_PARTITION) -> int:
    """Partitions so that one reduce task holds ~per_partition records."""
    return max(1, math.ceil(records / per_partition))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads masked keys (mostly-zero bits) evenly over partitions."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


# --------------------------------------------------------------------------- 1. spill


def spill(table_dir: str | Path, units: Sequence[str | Path], name: str, plan: Plan, rows_per_spill: int) -> None:
    """Map step: the exact (and near) records of `units` as spills/<name>-<c>.{exact,near}[.off].npy,
    partitioned, in chunks of `rows_per_spill` rows (so memory is O(rows_per_spill * tables))."""
    parts = [read_unit(u) for u in units]
    rows = np.concatenate([p["rows"] for p in parts]).astype(np.uint64)
    if len(rows) and (rows.max() >> np.uint64(ROW_BITS)):
        raise ValueError(f"row numbers must be < 2^{ROW_BITS}")
    sha = np.concatenate([p["sha"] for p in parts]).reshape(-1, 2)
    ph = np.concatenate([p["phash"] for p in parts])
    out = Path(table_dir) / SPILLS
    out.mkdir(parents=True, exist_ok=True)
    ex = np.stack([sha[:, 0], sha[:, 1], rows], axis=1)
    _write_partitioned(out / f"{name}.exact", ex, H0, plan.partitions)
    if plan.mode != "near":
        return
    masks = plan.masks
    salts = _mix(np.arange(1, len(masks) + 1, dtype=np.uint64))
    for c, start in enumerate(range(0, len(rows), rows_per_spill)):
        r, h = rows[start:start + rows_per_spill], ph[start:start + rows_per_spill]
        nr = np.empty((len(r) * len(masks), 3), np.uint64)
        nr[:, GKEY] = _mix((h[None, :] & masks[:, None]) ^ salts[:, None]).reshape(-1)
        nr[:, PHASH] = np.tile(h, len(masks))
        nr[:, ROW] = np.tile(r, len(masks)) | (np.repeat(np.arange(len(masks), dtype=np.uint64), len(r))
                                               << np.uint64(ROW_BITS))
        _write_partitioned(out / f"{name}-{c:04d}.near", nr, GKEY, plan.partitions)


def _save(path: Path, arr: np.ndarray) -> None:
    """np.save under a temporary name, then rename: spills are scratch (no fsync; a crash reruns the pass)."""
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def _write_partitioned(stem: Path, records: np.ndarray, col: int, partitions: int) -> None:
    """Records sorted by column `col`; partition p = the top log2(partitions) bits of that column,
    so each partition is one contiguous, already sorted run (offsets by searchsorted)."""
    records = records[np.argsort(records[:, col])]
    bounds = np.arange(partitions + 1, dtype=object) * (1 << 64) // partitions  # exact in Python ints
    off = np.searchsorted(records[:, col], np.array([min(int(b), 2**64 - 1) for b in bounds[:-1]], np.uint64))
    _save(stem.with_name(stem.name + ".npy"), records)
    _save(stem.with_name(stem.name + ".off.npy"), np.append(off, len(records)).astype(np.int64))


_SPILL_INDEX: dict[Path, tuple[int, np.ndarray]] = {}  # spill .npy -> (data offset, partition offsets)


def _spill_index(path: Path) -> tuple[int, np.ndarray]:
    """Where a spill's records start in its .npy file and its partition offsets, read once per process:
    a reduce task reads one slice of every spill, so per-slice overhead is what grows with N."""
    if path not in _SPILL_INDEX:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            if dtype != np.uint64 or len(shape) != 2 or shape[1] != 3:
                raise ValueError(f"{path}: not a dedup spill ({dtype}, {shape})")
            _SPILL_INDEX[path] = (f.tell(), np.load(path.with_name(path.name[:-4] + ".off.npy")))
    return _SPILL_INDEX[path]


def _partition_slice(table_dir: str | Path, kind: str, p: int) -> np.ndarray:
    """Partition p's records from every spill: one seek + read per spill (only that slice is loaded)."""
    chunks = []
    for path in sorted((Path(table_dir) / SPILLS).glob(f"*.{kind}.npy")):
        start, off = _spill_index(path)
        n = int(off[p + 1] - off[p])
        if n:
            chunks.append(np.fromfile(path, np.uint64, n * 3, offset=start + int(off[p]) * 24).reshape(n, 3))
    return np.concatenate(chunks) if chunks else np.zeros((0, 3), np.uint64)


# --------------------------------------------------------------------------- 2. reduce


def reduce_exact(table_dir: str | Path, p: int) -> np.ndarray:
    """(n, 2) int64 [dup_row, kept_row] of partition p: every row after the first of equal sha256."""
    r = _partition_slice(table_dir, "exact", p)
    r = r[np.lexsort((r[:, ROW], r[:, H1], r[:, H0]))]
    same = (r[1:, H0] == r[:-1, H0]) & (r[1:, H1] == r[:-1, H1])
    if not same.any():
        return np.zeros((0, 2), np.int64)
    start = np.flatnonzero(np.concatenate([[True], ~same]))  # first index of each group
    first = np.repeat(start, np.diff(np.append(start, len(r))))
    dup = np.flatnonzero(np.arange(len(r)) != first)
    return np.stack([r[dup, ROW], r[first[dup], ROW]], axis=1).astype(np.int64)


def reduce_near(table_dir: str | Path, p: int, plan: Plan) -> np.ndarray:
    """(n, 3) int64 [later_row, earlier_row, distance] of partition p, each pair once in the whole pass.

    Rows with the same phash as an earlier row get one *alias* pair (row, first row of that phash, 0)
    and no other pair; among the first rows of distinct phashes, every pair within the threshold.
    So a hash repeated m times costs m pairs, not m^2 (a placeholder image re-encoded a million
    times), and `resolve` gives the aliases the decision of their first row. A pair that collides in
    several tables is kept only by the first one (aliases: table 0), so pairs never pile up k-fold.
    """
    r = _partition_slice(table_dir, "near", p)
    g = r[:, GKEY]
    order = np.argsort(g, kind="stable")  # sorted runs, one per spill: merged in ~linear time
    same = g[order][1:] == g[order][:-1]
    if not same.any():
        return np.zeros((0, 3), np.int64)
    keep = np.concatenate([[False], same]) | np.concatenate([same, [False]])  # members of groups of >= 2
    r = r[order[keep]]
    r = r[np.lexsort((r[:, ROW] & ROW_MASK, r[:, PHASH], r[:, GKEY]))]
    table = (r[:, ROW] >> np.uint64(ROW_BITS)).astype(np.int64)
    rows = (r[:, ROW] & ROW_MASK).astype(np.int64)
    new_group = np.concatenate([[True], r[1:, GKEY] != r[:-1, GKEY]])
    new_hash = new_group | np.concatenate([[True], r[1:, PHASH] != r[:-1, PHASH]])
    first = np.flatnonzero(new_hash)
    first_row = np.repeat(rows[first], np.diff(np.append(first, len(r))))
    alias = ~new_hash & (table == 0)
    out = [np.stack([rows[alias], first_row[alias], np.zeros(int(alias.sum()), np.int64)], axis=1)]
    rep_hash, rep_row, rep_table = r[new_hash, PHASH], rows[new_hash], table[new_hash]
    gid = np.cumsum(new_group[new_hash])  # one rep per (group, distinct phash): its first row
    size = np.bincount(gid)[gid]
    idx = np.arange(len(rep_hash))
    masks = plan.masks
    for o in range(1, int(size.max())):  # pair every rep with the o-th next rep of its group
        idx = idx[size[idx] > o]
        a = idx[idx + o < len(rep_hash)]
        a = a[gid[a] == gid[a + o]]
        if not len(a):
            break
        b = a + o
        x = rep_hash[a] ^ rep_hash[b]
        d = np.bitwise_count(x).astype(np.int64)
        ok = np.flatnonzero(d <= plan.threshold)
        # the first table in which the pair's keys agree; only that table's partition emits it
        first_table = np.argmax((x[ok, None] & masks[None, :]) == 0, axis=1)
        ok = ok[first_table == rep_table[a[ok]]]
        ra, rb = rep_row[a[ok]], rep_row[b[ok]]
        out.append(np.stack([np.maximum(ra, rb), np.minimum(ra, rb), d[ok]], axis=1))
    return np.concatenate(out)


# --------------------------------------------------------------------------- 3. resolve, 4. name


@dataclass(frozen=True)
class Decisions:
    """Removed rows, sorted by row: why, and which kept row they duplicate."""

    row: np.ndarray  # int64
    reason: np.ndarray  # uint8 code into REASONS
    kept_row: np.ndarray  # int64
    distance: np.ndarray  # int8 Hamming distance of the phashes (0 for exact)
    key: np.ndarray  # S, key of the removed row
    kept_key: np.ndarray  # S, key of the kept row

    def __len__(self) -> int:
        return len(self.row)

    def counts(self) -> dict[str, int]:
        return {REASONS[c]: int(n) for c, n in zip(*np.unique(self.reason, return_counts=True))}

    def for_rows(self, first: int, end: int) -> list[dict]:
        """skipped.jsonl records {"row", "key", "reason", "detail"} of the removed rows in [first, end)."""
        lo, hi = np.searchsorted(self.row, [first, end])
        out = []
        for i in range(lo, hi):
            kept = self.kept_key[i].decode()
            detail = (f"same bytes as {kept}" if self.reason[i] == 1
                      else f"phash within {int(self.distance[i])} bits of {kept}")
            out.append({"row": int(self.row[i]), "key": self.key[i].decode(), "reason": REASONS[self.reason[i]],
                        "detail": detail, "kept_key": kept})
        return out

    def removed_keys(self, first: int, end: int) -> set[str]:
        """Keys of the removed rows in [first, end): what `filter_shard` drops from that shard."""
        lo, hi = np.searchsorted(self.row, [first, end])
        return {k.decode() for k in self.key[lo:hi]}

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(path, self.to_bytes())

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, row=self.row, reason=self.reason, kept_row=self.kept_row, distance=self.distance,
                 key=self.key, kept_key=self.kept_key)
        return buf.getvalue()

    @classmethod
    def load(cls, path: str | Path) -> Decisions:
        return cls.from_bytes(Path(path).read_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> Decisions:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(**{f: z[f] for f in ("row", "reason", "kept_row", "distance", "key", "kept_key")})


def resolve(exact_pairs: np.ndarray, near_pairs: np.ndarray) -> np.ndarray:
    """(n, 4) int64 [removed row, reason code, kept row, distance], sorted by row, by the row-order
    rule (module docstring).

    Memory: a bitmap of removed rows (max row / 8 bytes: 125 MB at 10^9 rows) instead of a dict per
    removed row, the near decisions in arrays, and a dict only for rows that aliases point to.
    """
    exact = np.asarray(exact_pairs, np.int64).reshape(-1, 2)
    near_pairs = np.asarray(near_pairs, np.int64).reshape(-1, 3)
    top = int(max(exact[:, 0].max(initial=-1), near_pairs[:, 0].max(initial=-1))) + 1
    removed = np.zeros(top // 8 + 1, np.uint8)
    np.bitwise_or.at(removed, exact[:, 0] >> 3, (1 << (exact[:, 0] & 7)).astype(np.uint8))
    bits = bytearray(removed.tobytes())  # Python-speed lookups in the loop below
    out_row, out_kept, out_d = [], [], []
    if len(near_pairs):
        near_pairs = np.unique(near_pairs, axis=0)  # sorted by (later, earlier): the order of the rule
        later = near_pairs[:, 0]
        is_alias = near_pairs[:, 2] == 0
        targets = set(near_pairs[is_alias, 1].tolist())  # rows whose decision an alias will copy
        decided: dict[int, tuple[int, int]] = {}  # target row removed -> (kept row, distance)
        starts = np.flatnonzero(np.concatenate([[True], later[1:] != later[:-1]]))
        ends = np.append(starts[1:], len(later))
        for c in range(0, len(starts), RESOLVE_CHUNK):  # Python objects for one chunk of rows at a time
            base = int(starts[c])
            pairs = near_pairs[base:int(ends[min(c + RESOLVE_CHUNK, len(starts)) - 1])].tolist()
            for s, e in zip((starts[c:c + RESOLVE_CHUNK] - base).tolist(), (ends[c:c + RESOLVE_CHUNK] - base).tolist()):
                _resolve_one(pairs, s, e, bits, decided, targets, out_row, out_kept, out_d)
    near = np.array([out_row, [2] * len(out_row), out_kept, out_d], np.int64).T.reshape(-1, 4)
    ex = np.stack([exact[:, 0], np.ones(len(exact), np.int64), exact[:, 1], np.zeros(len(exact), np.int64)], axis=1)
    allr = np.concatenate([ex, near])
    return allr[np.argsort(allr[:, 0], kind="stable")]


def _resolve_one(pairs: list, s: int, e: int, bits: bytearray, decided: dict, targets: set,
                 out_row: list, out_kept: list, out_d: list) -> None:
    """Decide row j = pairs[s][0] from its candidate pairs pairs[s:e] (earlier rows ascending)."""
    j = pairs[s][0]
    if bits[j >> 3] >> (j & 7) & 1:  # already removed (exact duplicate)
        return
    choice = None
    if pairs[s][2] == 0:  # an alias: same phash as row i, which was decided before j
        i = pairs[s][1]
        # i kept -> j duplicates i; i removed (near, not exact: i is the first row of its phash) ->
        # the earliest kept row within the threshold of j is i's, at the same distance. (.get: only
        # inconsistent input -- equal bytes, different phash -- leaves i without an entry; j names i.)
        choice = decided.get(i, (i, 0)) if bits[i >> 3] >> (i & 7) & 1 else (i, 0)
    else:
        for _, i, d in pairs[s:e]:
            if not bits[i >> 3] >> (i & 7) & 1:  # earlier rows are final: decided before j
                choice = (i, d)
                break
    if choice is not None:
        bits[j >> 3] |= 1 << (j & 7)
        out_row.append(j)
        out_kept.append(choice[0])
        out_d.append(choice[1])
        if j in targets:
            decided[j] = choice


def _name(table_dir: str | Path, removed: np.ndarray) -> Decisions:
    rows, reason, kept, dist = (removed[:, c] for c in range(4))
    reason, dist = reason.astype(np.uint8), dist.astype(np.int8)
    need = np.unique(np.concatenate([rows, kept]))  # sorted
    names: dict[int, bytes] = {}
    for path in unit_paths(table_dir):  # one unit in memory at a time
        u = read_unit(path)
        if not len(u["rows"]):
            continue
        # only the needed rows inside this unit's row range: O(unit + its share of `need`), not O(need)
        lo = np.searchsorted(need, u["rows"].min(), side="left")
        hi = np.searchsorted(need, u["rows"].max(), side="right")
        hit = np.isin(u["rows"], need[lo:hi])
        names.update(zip(u["rows"][hit].tolist(), u["keys"][hit].tolist()))
    key = np.array([names[r] for r in rows.tolist()], dtype="S") if len(rows) else np.zeros(0, "S1")
    kept_key = np.array([names[r] for r in kept.tolist()], dtype="S") if len(rows) else np.zeros(0, "S1")
    return Decisions(rows, reason, kept, dist, key, kept_key)


# --------------------------------------------------------------------------- the driver


def _count_rows(paths: list[Path]) -> list[int]:
    counts = []
    for p in paths:
        with np.load(p, allow_pickle=False) as z:
            counts.append(len(z["rows"]))
    return counts


def _spill_groups(paths: list[Path], counts: list[int], rows_per_spill: int) -> list[list[Path]]:
    """Consecutive units with ~rows_per_spill rows per group (a unit is never split)."""
    groups: list[list[Path]] = [[]]
    size = 0
    for p, c in zip(paths, counts):
        if groups[-1] and size + c > rows_per_spill:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += c
    return [g for g in groups if g]


def make_plan(mode: Literal["exact", "near"], rows: int, *, threshold: int = NEAR_THRESHOLD,
              partitions: int | None = None, blocks: int | None = None,
              partition_records: int = RECORDS_PER_PARTITION) -> Plan:
    """The plan for `rows` rows: blocks from mih.plan_blocks, partitions from the record count."""
    blocks = blocks or plan_blocks(threshold, rows)
    tables = len(table_masks(threshold, blocks)) if mode == "near" else 1
    return Plan(mode, threshold, partitions or partitions_for(rows * tables, partition_records), blocks)


def dedup(table_dir: str | Path, *, mode: Literal["exact", "near"] = "exact", threshold: int = NEAR_THRESHOLD,
          partitions: int | None = None, blocks: int | None = None, spill_records: int = RECORDS_PER_SPILL,
          partition_records: int = RECORDS_PER_PARTITION, processes: int = 1,
          map_fn: Callable | None = None) -> Decisions:
    """Run spill -> reduce -> resolve -> name over all unit files; write and return the decisions.

    The spill and reduce calls go through `map_fn(fn, *iterables)` (results in call order: the
    builder passes one that runs them on its runner), else a pool of `processes` processes.

    Consecutive units make one spill of ~`spill_records` records (rows x tables); a reduce task
    opens every spill once, so the fan-in is N * tables / spill_records files (see docs/dedup.md).
    """
    if mode not in ("exact", "near"):
        raise ValueError(f"dedup mode {mode!r}: expected 'exact' or 'near'")
    table_dir = Path(table_dir)
    paths = unit_paths(table_dir)
    counts = _count_rows(paths)
    plan = make_plan(mode, max(1, sum(counts)), threshold=threshold, partitions=partitions, blocks=blocks,
                     partition_records=partition_records)
    for old in (table_dir / SPILLS).glob("*.npy"):  # a rerun replaces the spills of an earlier plan
        old.unlink()
    _SPILL_INDEX.clear()
    tables = len(plan.masks) if mode == "near" else 1
    groups = _spill_groups(paths, counts, max(1, spill_records // tables))
    with _pool(processes if map_fn is None else 1) as pool:
        pmap = map_fn or pool.map
        rows_per_spill = max(1, spill_records // tables)
        list(pmap(spill, [table_dir] * len(groups), groups, [f"s{i:06d}" for i in range(len(groups))],
                      [plan] * len(groups), [rows_per_spill] * len(groups)))
        parts = range(plan.partitions)
        exact = list(pmap(reduce_exact, [table_dir] * plan.partitions, parts))
        near = (list(pmap(reduce_near, [table_dir] * plan.partitions, parts, [plan] * plan.partitions))
                if mode == "near" else [])
    removed = resolve(np.concatenate(exact) if exact else np.zeros((0, 2), np.int64),
                      np.concatenate(near) if near else np.zeros((0, 3), np.int64))
    decisions = _name(table_dir, removed)
    decisions.save(table_dir / DECISIONS)
    return decisions


class _Serial:
    def map(self, fn, *its: Iterable):
        return map(fn, *its)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _pool(processes: int):
    # spawn: the caller may hold threads (Ray, a thread pool) that a fork would copy half-initialised
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) if processes > 1 else _Serial()
