"""Stage 2 of the build, the text pass: row checks, hashtags, unique keys, mapping, counts.

It runs on the same runner as the images (local processes or Ray), in three rounds of small tasks,
each reading its own rows; the driver only merges per-task results:

1. scan (one task per text unit): read key + caption, check every row (a reader problem, then a
   null key), extract the hashtags of the usable rows, return the unit's DISTINCT tags, and write the
   usable rows' (row, key, safe key) to `_work/keys/unit-NNNNNN.arrows`, one Arrow IPC message per key
   bucket behind a fixed-width offsets header (a keys task reads one byte range of each unit's spill).
2. keys (one task per bucket): key uniqueness without a global in-memory set. Rows are partitioned
   by a hash of their webdataset-safe key into B buckets (B = rows / KEYS_PER_BUCKET, rounded up),
   so every pair of rows that could clash -- the same source key, or two keys that sanitise to the
   same safe key -- meets in one bucket. In row order there: a source key seen before makes the later
   row `duplicate_key` (skipped; detail names the first row), and a safe key taken by an earlier row
   gets `_r<row>` appended. Only these exceptions are written (`_work/keys/bucket-BBBB.parquet`,
   sorted by row); most builds have none, and then nothing is read back.
   (The one clash this cannot see: a suffixed key `x_r27` equal to another row's own key `x_r27`.)
   A keys task reads one byte range per (spill file, bucket): with one spill per unit that is
   units x buckets reads, which grows with rows^2 (16k at 10^7 rows of 25k-row files, 160M at
   10^9: on object storage, 160M range requests). Past MERGE_MIN_READS, a merge round (2a) first
   joins runs of consecutive units' spills into `_work/keys/group-NNNNNN.arrows` files of about
   GROUP_ROWS rows, bucket by bucket, copying bytes (no Arrow decode); the keys round then reads
   (units / group) x buckets ranges (8M at 10^9 rows), the decisions unchanged.
3. count (one task per text unit, after the driver mapped every distinct hashtag ONCE, reusing the
   mapping cache): rows per hashtag and rows per synset (a row counts once per synset any of its
   tags maps to), over the rows that passed the checks and are not duplicates.
   Warm builds skip most of it: the driver ships the mapping cache (`_work/known.parquet`, up to
   WARM_MAX_TAGS tags) to the scan round, and a unit whose every tag is in it is counted right there;
   round 3 then runs only for the units that had an unknown tag, and, to subtract their
   contribution, for counted units that hold a duplicate row.

Tags are mapped with `maws_data.wordnet.HashtagMapper` (~0.5 ms a tag); a mapping cache (a parquet
file per mapping configuration, under `mapping_cache`, default ~/.cache/maws-data/hashtag-maps) keeps
every tag it has mapped, so a rerun, a resume or a larger build only maps tags it has never seen.
The driver maps up to MAP_MIN_TAGS new tags itself; more go to a mapping round (2b) on the runner,
MAP_TASK_TAGS per task, each worker loading WordNet once (~150 MB) and returning the tags' wnids,
rules and synset names (10^7 new tags: ~1.4 h of one core, spread over the cluster). A worker that
cannot load WordNet (a Ray node without it) hands its tags back for the driver to map.

Memory: a worker holds one text unit (or one key bucket, or one merge group's spill bytes, twice:
~40 MB at GROUP_ROWS, or WordNet and one mapping task's tags), and the shipped tag table of its
round as columns (`Known`: the mapping cache when warm in round 1, the build's distinct tags in round 3);
the driver holds the distinct hashtags with their counts and mapping, the synset counts, and the
mapping cache with, when warm, a dense count per cached tag and synset (`Known`): all as polars
columns and numpy arrays (~500 B a distinct tag at the driver's peak RSS, most of it polars'
temporaries; no Python object per tag but the ones mapped now).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from maws_data import storage
from maws_data.hashtags import (
    caption_tags,
    expand_csr,
    mine_counts,
    tag_generation,
    tag_names,
    tags_met,
    unique_grouped,
)
from maws_data.manifest import read_bytes, write_bytes
from maws_data.plan import Plan, Span
from maws_data.sources import SourceConfig, SourceFile, read_rows

KEY_MAX_LEN = 64  # tar USTAR names hold 100 bytes; leave room for ".json" and margin
UNSAFE_KEY_PATTERN = r"[^A-Za-z0-9_-]"
KEYS_PER_BUCKET = 250_000  # rows per key bucket: bounds the memory of one keys task (~30 MB)
MERGE_MIN_READS = 250_000  # (spill file, bucket) reads in the keys round past which units are merged first
GROUP_ROWS = 500_000  # rows per merged spill: bounds the memory of one merge task (its spills' bytes, twice)
WORK_DIR = "_work"
TAGS_NAME = "tags.parquet"
KNOWN_NAME = "known.parquet"
MAP_MIN_TAGS = 20_000  # fewer new tags than this are mapped in the driver: a worker loading WordNet costs ~4 s
MAP_TASK_TAGS = 10_000  # new tags per mapping task at most (~5 s of HashtagMapper.explain at ~0.5 ms a tag)
WARM_MAX_TAGS = 5_000_000  # a larger mapping cache is not shipped to every worker (memory); counting then waits for round 3


# ---------------------------------------------------------------------------------------------
# Row checks and keys (shared with the image pass, so both decide every row the same way)


def row_checks(df: pl.DataFrame, row0: int) -> pl.DataFrame:
    """Add `row` (global id), `reason` and `detail` (null when the row is usable) to a source chunk."""
    no_key = pl.col("key").is_null() | (pl.col("key").str.strip_chars() == "")
    return df.with_columns(
        (pl.int_range(pl.len(), dtype=pl.UInt64) + row0).alias("row"),
        pl.when(pl.col("problem").is_not_null()).then(pl.col("problem"))
        .when(no_key).then(pl.lit("null_key")).alias("reason"),
        pl.when(pl.col("problem").is_not_null()).then(pl.lit("the source reader could not read this row cleanly"))
        .when(no_key).then(pl.lit("the key is null or empty")).alias("detail"),
    )


def safe_keys(keys: pl.Series) -> pl.Series:
    """Webdataset-safe keys: every character outside [A-Za-z0-9_-] becomes '_'; longer than KEY_MAX_LEN
    -> the first 47 + '_' + 16 hex digits of the source key's SHA-1."""
    safe = keys.str.replace_all(UNSAFE_KEY_PATTERN, "_")
    long = safe.str.len_chars() > KEY_MAX_LEN
    if long.any():
        out = safe.to_list()
        for i in long.arg_true().to_list():
            out[i] = out[i][:KEY_MAX_LEN - 17] + "_" + hashlib.sha1(keys[i].encode()).hexdigest()[:16]
        safe = pl.Series(keys.name, out, dtype=pl.String)
    return safe


def safe_key(key: str) -> str:
    """`safe_keys` for one key (uniqueness is the keys round's job)."""
    return safe_keys(pl.Series([key], dtype=pl.String))[0]


def key_buckets(rows: int) -> int:
    return max(1, math.ceil(rows / KEYS_PER_BUCKET))


def _bucket_of(safe: pl.Series, buckets: int) -> pl.Series:
    # polars' hash is stable for a given polars version; only the work split depends on it, never a byte of output
    return (safe.hash(seed=0) % buckets).cast(pl.UInt32)


def exceptions_for(work: str, buckets: int, lo: int, hi: int) -> pl.DataFrame:
    """The keys round's decisions for rows [lo, hi): row, reason (duplicate_key or null), key (new), detail."""
    parts = []
    for b in range(buckets):
        table = pq.read_table(parquet_source(_bucket_url(work, b)), filters=[("row", ">=", lo), ("row", "<", hi)])
        parts.append(pl.from_arrow(table))
    return pl.concat(parts).sort("row") if parts else _empty_exceptions()


def _empty_exceptions() -> pl.DataFrame:
    return pl.DataFrame(schema={"row": pl.UInt64, "reason": pl.String, "key": pl.String, "detail": pl.String})


def parquet_source(url: str):
    """What pyarrow reads a parquet file from: the path, or a seekable remote file (range reads)."""
    if not storage.is_remote(url):
        return url
    fs, path = storage.filesystem(url)
    return fs.open(path, "rb")


SPILL_SCHEMA = pa.schema([("row", pa.uint64()), ("key", pa.large_string()), ("safe", pa.large_string())])


SPILL_MAGIC = b"MAWSKEY2"  # then (buckets + 1) little-endian u64 file offsets: bucket b is bytes [off[b], off[b+1])


def _spill_bytes(usable: pl.DataFrame, buckets: int) -> bytes:
    """A unit's keys, one Arrow IPC record-batch message per non-empty bucket, after a fixed-width
    header (SPILL_MAGIC + (buckets + 1) u64 offsets): a keys task reads its bucket's 16 header bytes
    and then that one byte range of every unit's spill. Fixed width, because a JSON header of every
    bucket cost each (bucket, unit) read O(buckets): 24 us at 40 buckets (10^7 rows) but ~1 ms at
    4000 (10^9), where the keys round reads 40k units x 4000 buckets; messages without a schema
    each, because a stream per bucket cost ~10 us more per bucket to write."""
    # one arrow conversion for the whole unit, sorted by bucket (stable: row order kept inside a
    # bucket), then zero-copy slices per bucket: a polars partition + conversion per bucket cost more
    import numpy as np

    usable = usable.sort("bucket", maintain_order=True)  # in polars: pa.array(numpy) would import pandas
    bucket = usable["bucket"].to_numpy()
    batch = usable.select("row", "key", "safe").to_arrow().cast(SPILL_SCHEMA).combine_chunks()
    sizes = np.bincount(bucket, minlength=buckets) if len(bucket) else np.zeros(buckets, np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    blobs = [batch.slice(starts[b], starts[b + 1] - starts[b]).to_batches()[0].serialize().to_pybytes()
             if sizes[b] else b"" for b in range(buckets)]
    return _spill_file(blobs, buckets)


def _read_spill(url: str, bucket: int) -> pa.Table | None:
    """One bucket's keys from a unit's (or a group's) spill (None when it has none in that bucket)."""
    at = len(SPILL_MAGIC) + 8 * bucket
    if storage.is_remote(url):
        # two exact range requests: a file object would read ahead a whole block (5 MB in s3fs) for
        # each, ~70 ms per read of a 20 MB group spill on a local SeaweedFS
        fs, path = storage.filesystem(url)
        head = fs.cat_file(path, start=at, end=at + 16)
        lo, hi = int.from_bytes(head[:8], "little"), int.from_bytes(head[8:], "little")
        return None if hi == lo else _batches(fs.cat_file(path, start=lo, end=hi))
    with open(url, "rb") as fh:
        fh.seek(at)
        lo, hi = int.from_bytes(fh.read(8), "little"), int.from_bytes(fh.read(8), "little")
        if hi == lo:
            return None
        fh.seek(lo)
        return _batches(fh.read(hi - lo))


def _read_bucket(urls: list[str], bucket: int) -> list[pa.Table]:
    """One bucket's keys from every spill in `urls`, in their order (spills with none in it left
    out). Remote: two rounds of concurrent range requests (fsspec `cat_ranges`: every header, then
    every byte range), not two requests one after the other per spill: at 10^9 rows a keys task
    reads ~2,000 group spills, ~40 s of round trips one at a time at ~10 ms each."""
    if not urls or not storage.is_remote(urls[0]):
        return [part for url in urls if (part := _read_spill(url, bucket)) is not None]
    fs, _ = storage.filesystem(urls[0])
    paths = [storage.filesystem(url)[1] for url in urls]  # one work dir: one filesystem (fsspec caches it)
    at = len(SPILL_MAGIC) + 8 * bucket
    heads = fs.cat_ranges(paths, [at] * len(paths), [at + 16] * len(paths), on_error="raise")
    found = [(path, int.from_bytes(h[:8], "little"), int.from_bytes(h[8:], "little")) for path, h in zip(paths, heads)]
    found = [(path, lo, hi) for path, lo, hi in found if hi > lo]
    if not found:
        return []
    blobs = fs.cat_ranges([f[0] for f in found], [f[1] for f in found], [f[2] for f in found], on_error="raise")
    return [_batches(blob) for blob in blobs]


def _batches(blob: bytes) -> pa.Table:
    """The record-batch messages of one bucket's byte range (one in a unit's spill, one per unit in
    a group's), as a table."""
    reader = pa.ipc.MessageReader.open_stream(pa.py_buffer(blob))
    return pa.Table.from_batches([pa.ipc.read_record_batch(m, SPILL_SCHEMA) for m in reader], SPILL_SCHEMA)


def _spill_ranges(blob: bytes, buckets: int) -> list[int]:
    """A spill's (buckets + 1) offsets: bucket b is blob[off[b]:off[b + 1]]."""
    import numpy as np

    if blob[:len(SPILL_MAGIC)] != SPILL_MAGIC:
        raise ValueError("not a key spill (bad magic)")
    return np.frombuffer(blob, "<u8", buckets + 1, len(SPILL_MAGIC)).tolist()


def _spill_file(pieces: list, buckets: int, sizes: list[int] | None = None, per: int = 1) -> bytes:
    """SPILL_MAGIC, the offsets header, then each bucket's bytes (the layout `_read_spill` reads):
    bucket b is pieces[b * per:(b + 1) * per] (bytes or views; `sizes`: their lengths)."""
    import numpy as np

    lengths = np.asarray(sizes if sizes is not None else list(map(len, pieces)), np.int64)
    ends = np.cumsum(lengths.reshape(buckets, per).sum(axis=1))
    offsets = len(SPILL_MAGIC) + 8 * (buckets + 1) + np.concatenate([np.zeros(1, np.int64), ends])
    return b"".join([SPILL_MAGIC, offsets.astype("<u8").tobytes(), *pieces])


def _unit_url(work: str, unit: int) -> str:
    return storage.join(work, "keys", f"unit-{unit:06d}.arrows")


def _group_url(work: str, group: int) -> str:
    return storage.join(work, "keys", f"group-{group:06d}.arrows")


def _spill_urls(work: str, units: int, group: int) -> list[str]:
    """What the keys round reads: every unit's spill, or (group > 1) every group's."""
    if group <= 1:
        return [_unit_url(work, u) for u in range(units)]
    return [_group_url(work, g) for g in range(math.ceil(units / group))]


def spill_group(unit_rows: list[int], buckets: int) -> int:
    """Units per merged spill (1: no merge round). The keys round reads one range per (spill file,
    bucket): units x buckets grows with rows^2 (160M reads at 10^9 rows of 25k-row files), so past
    MERGE_MIN_READS a merge round first joins runs of consecutive units into files of about
    GROUP_ROWS rows, and the keys round reads (units / group) x buckets ranges instead."""
    units = len(unit_rows)
    if units * buckets <= MERGE_MIN_READS or units < 2:
        return 1
    mean_rows = max(1, sum(unit_rows) // units)
    return max(2, min(units, GROUP_ROWS // mean_rows))


def _bucket_url(work: str, bucket: int) -> str:
    return storage.join(work, "keys", f"bucket-{bucket:04d}.parquet")


# ---------------------------------------------------------------------------------------------
# Round 1: scan


@dataclass(frozen=True)
class UnitTask:
    unit: int
    file: SourceFile
    span: Span
    source: SourceConfig
    work: str
    buckets: int
    fingerprint: str = ""
    exceptions: bool = False  # round 3: whether the keys round found any duplicate
    warm: bool = False  # round 1: count too, if the mapping cache knows every tag of the unit
    dups_only: bool = False  # round 3: count only the unit's duplicate rows (to subtract them)

    @property
    def rows(self) -> int:
        return self.span.rows

    def name(self) -> str:
        return f"text unit {self.unit} ({self.file.url} rows {self.span.first}..{self.span.end})"


def _usable_text(task: UnitTask) -> tuple[pl.DataFrame, pl.Series]:
    """The unit's checked rows, and the captions of the usable ones (null for the others)."""
    df = row_checks(read_rows(task.file, task.source, task.span.first, task.span.end,
                              byte_range=task.span.byte_range, text_only=True), task.span.row0)
    return df, df.select(pl.when(pl.col("reason").is_null()).then(pl.col("caption"))).to_series()


def scan_unit(task: UnitTask) -> dict:
    """Round 1 (module docstring). Returns {"tags": distinct hashtags (a Series), "usable": rows, "counts"}:
    when counted (warm), "counts" is `Known.count`'s pair of (index, rows) arrays and "tags" is None."""
    df, captions = _usable_text(task)
    usable = df.filter(pl.col("reason").is_null()).select("row", "key")
    usable = usable.with_columns(safe_keys(usable["key"]).alias("safe"))
    usable = usable.with_columns(_bucket_of(usable["safe"], task.buckets).alias("bucket"))
    write_bytes(_unit_url(task.work, task.unit), _spill_bytes(usable, task.buckets), durable=False)
    if task.warm:
        counts, tags = _known(task.work, task.fingerprint).count(captions)
    else:
        counts, (tags, _, _) = None, mine_counts(captions)
    # counted: the tags are those with a count (each >= 1), not shipped twice
    tags = None if counts is not None else pl.Series("name", tags, dtype=pl.String)
    return {"tags": tags, "usable": usable.height, "counts": counts}


# ---------------------------------------------------------------------------------------------
# Round 2a (large builds only): merge runs of unit spills


@dataclass(frozen=True)
class MergeTask:
    group: int
    work: str
    buckets: int
    first_unit: int
    end_unit: int

    @property
    def rows(self) -> int:
        return 0

    def name(self) -> str:
        return f"key spill group {self.group} (units {self.first_unit}..{self.end_unit})"


def merge_spills(task: MergeTask) -> dict:
    """Join units [first_unit, end_unit)'s spills into one: bucket b's section is their bucket-b
    messages in unit order, copied as bytes (no Arrow decode), so a bucket's rows stay in row order."""
    blobs = [memoryview(read_bytes(_unit_url(task.work, u))) for u in range(task.first_unit, task.end_unit)]
    ranges = [_spill_ranges(blob, task.buckets) for blob in blobs]
    # bucket-major slices (views: the bytes are copied once, into the file's one join)
    pieces = [blob[r[b]:r[b + 1]] for b in range(task.buckets) for blob, r in zip(blobs, ranges)]
    sizes = [r[b + 1] - r[b] for b in range(task.buckets) for r in ranges]
    write_bytes(_group_url(task.work, task.group), _spill_file(pieces, task.buckets, sizes, per=len(blobs)),
                durable=False)
    return {"units": len(blobs)}


def merge_tasks(work: str, units: int, buckets: int, group: int) -> list[MergeTask]:
    return [MergeTask(g, work, buckets, first, min(first + group, units))
            for g, first in enumerate(range(0, units, group))]


# ---------------------------------------------------------------------------------------------
# Round 2: keys


@dataclass(frozen=True)
class KeyTask:
    bucket: int
    work: str
    units: int
    unit_rows: tuple[int, ...] = ()  # the first row of every text unit, to say which units hold duplicates
    group: int = 1  # units per spill file (> 1: read the merge round's group spills)

    @property
    def rows(self) -> int:
        return 0

    def name(self) -> str:
        return f"key bucket {self.bucket}"


COMBINE_MIN_CHUNKS = 1_000  # a bucket read from more unit slices than this is made one chunk first


def _one_table(parts: list[pa.Table]) -> pa.Table:
    """The bucket's parts as one table. From thousands of small batches (a unit's share of a bucket,
    at 10^8 rows and up) polars converts ~3x slower and every later operation runs over thousands of
    chunks, so past COMBINE_MIN_CHUNKS they are first copied into one; below it, the copy would only
    add its ~50 B a key to the task's peak (+15-20 MB of a worker's RSS at 250k keys)."""
    table = pa.concat_tables(parts)
    return table.combine_chunks() if len(parts) > COMBINE_MIN_CHUNKS else table


def _first_distinct(values: pl.Series) -> pl.Series:
    """`values.is_first_distinct()`, decided on 64-bit hashes first (2-3x faster on 250k keys) and
    exactly only over the rows whose hash repeats: every repeated value is among them, and a hash
    collision only adds rows to that exact check."""
    h = values.hash(seed=0)
    first = h.is_first_distinct()
    if first.all():
        return first
    suspect = h.is_in(h.filter(~first).implode())
    return first.scatter(suspect.arg_true(), values.filter(suspect).is_first_distinct())


def _key_exceptions(df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """A bucket's (row, key, safe) rows in row order -> (every exception, the duplicates, the renamed):
    a repeated key is a duplicate of its first row; a kept key whose safe form another kept key
    already has is renamed (safe + "_r" + row)."""
    first = _first_distinct(df["key"])
    dups = df.filter(~first).join(df.filter(first).select("key", pl.col("row").alias("first")), on="key")
    dups = dups.select("row", pl.lit("duplicate_key").alias("reason"), pl.lit(None, pl.String).alias("key"),
                       pl.Series("detail", [f"key {k!r} already used by row {r}"
                                            for k, r in zip(dups["key"].to_list(), dups["first"].to_list())],
                                 dtype=pl.String))
    kept = df if dups.height == 0 else df.filter(first)  # no duplicate: no copy
    renamed = kept.filter(~_first_distinct(kept["safe"])).select(
        "row", pl.lit(None, pl.String).alias("reason"),
        (pl.col("safe") + "_r" + pl.col("row").cast(pl.String)).alias("key"), pl.lit(None, pl.String).alias("detail"))
    out = pl.concat([_empty_exceptions(), dups.cast(_empty_exceptions().schema),
                     renamed.cast(_empty_exceptions().schema)]).sort("row")
    return out, dups, renamed


def resolve_keys(task: KeyTask) -> dict:
    """Round 2 (module docstring). Returns {"duplicates": n, "renamed": n, "dup_units": [unit, ...]}."""
    parts = _read_bucket(_spill_urls(task.work, task.units, task.group), task.bucket)
    table = _one_table(parts) if parts else SPILL_SCHEMA.empty_table()
    # the common case, decided on one column: a safe key is a function of its key, so distinct
    # safe keys mean distinct keys and nothing to rename (half the task's time at 250k keys)
    if _first_distinct(pl.from_arrow(table.column("safe"))).all():
        out = dups = renamed = _empty_exceptions()
    else:
        # one arrow -> polars conversion for the bucket, not one per unit
        df = pl.from_arrow(table)
        # units cover increasing row ranges and a spill keeps row order inside a bucket, so the rows
        # arrive sorted; sorting anyway cost ~30 MB of the task's ~80 MB at 250k rows (the worker's peak)
        out, dups, renamed = _key_exceptions(df if df["row"].is_sorted() else df.sort("row"))
    buf = io.BytesIO()
    pq.write_table(out.to_arrow(), buf, row_group_size=65536)
    write_bytes(_bucket_url(task.work, task.bucket), buf.getvalue(), durable=False)
    import numpy as np

    dup_units = np.unique(np.searchsorted(np.asarray(task.unit_rows, np.int64), dups["row"].to_numpy(), "right") - 1)
    return {"duplicates": dups.height, "renamed": renamed.height, "dup_units": dup_units.tolist()}


# ---------------------------------------------------------------------------------------------
# Round 3: counts


class Known:
    """A (hashtag, wnids) table sorted by hashtag, as shipped to the workers, and the numbering both
    sides use for its counts: tag i is the table's row i, synset j the j-th of its sorted distinct
    wnids. The scan round's is the mapping cache (`_work/known.parquet`), the count round's the
    build's distinct tags (`_work/tags.parquet`). A counted unit returns (index, rows) arrays instead of names: 8 bytes
    an entry instead of ~30, and the driver adds them into two dense arrays, so it unpickles no
    string and merges nothing with polars (that merge and the larger results cost the driver
    ~0.9 s of CPU in a 2-process scan at 10^7 rows, on the cores the workers need).
    Memory: O(tags in the table), in the driver and in each worker, as Arrow columns and numpy
    arrays (~40 B a tag plus its wnids' bytes): no Python object per tag."""

    def __init__(self, table: pa.Table | pl.DataFrame):
        """`table`: (hashtag, wnids) sorted by hashtag, as `_hashtag_table` makes it, or the same
        columns as a polars frame (not copied)."""
        import numpy as np

        df = table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)
        self.tags: pl.Series = df["hashtag"]
        self._wnids: pl.Series = df["wnids"]
        self.synsets: pl.Series = self._wnids.explode().drop_nulls().unique().sort()
        self.tag_rows = np.zeros(len(self.tags), np.int64)  # the driver's sums
        self.synset_rows = np.zeros(len(self.synsets), np.int64)

    @classmethod
    def of(cls, tags: list[str], wnids: list) -> Known:
        """From Python lists (sorted tags)."""
        return cls(_hashtag_table(tags, wnids))

    # the worker's side only (built on first use: the driver never needs them)
    @functools.cached_property
    def _synset_table(self):
        """Tag row -> its synsets' indices, as arrays (start, length, flat), for `expand_csr`."""
        import numpy as np

        lens = self._wnids.list.len().to_numpy().astype(np.int64)
        flat = self.synsets.search_sorted(self._wnids.explode().drop_nulls()).to_numpy().astype(np.int64)
        return np.cumsum(lens) - lens, lens, flat

    _rows_of_ids = None  # this process's tag id (hashtags.caption_tags) -> row here, -1 when not cached
    _generation = -1  # hashtags.tag_generation() when _rows_of_ids was started

    def _rows(self, tag_ids):
        import numpy as np

        if self._generation != tag_generation():  # the process renumbered its tags
            self._rows_of_ids, self._generation = np.zeros(0, np.int64), tag_generation()
        new = tag_names(range(len(self._rows_of_ids), tags_met()))
        if new:  # only tags new to this process are looked up, by binary search in the sorted table
            probe = pl.Series(new, dtype=pl.String)
            at = np.minimum(self.tags.search_sorted(probe).to_numpy().astype(np.int64), max(len(self.tags) - 1, 0))
            found = (self.tags.gather(at) == probe).to_numpy() if len(self.tags) else np.zeros(len(new), bool)
            self._rows_of_ids = np.concatenate([self._rows_of_ids, np.where(found, at, -1)])
        return self._rows_of_ids[tag_ids]

    def count(self, captions: pl.Series) -> tuple[dict | None, list[str]]:
        """(a unit's counts as {"tags": (index, rows), "synsets": (index, rows)} arrays, []) when the
        cache holds every tag of `captions`; else (None, the distinct tags). The worker's side: all
        integer work, a tag's string is looked up once per process."""
        import numpy as np

        caption, tag_id = caption_tags(captions)
        rows = self._rows(tag_id)
        if (rows < 0).any():
            return None, tag_names(np.unique(tag_id).tolist())
        tag_rows = np.bincount(rows, minlength=len(self.tags))
        starts, lens, flat = self._synset_table
        pair_caption, synset = expand_csr(caption, rows, starts, lens, flat)
        n = max(len(self.synsets), 1)
        synset_rows = np.bincount(unique_grouped(pair_caption * n + synset) % n, minlength=len(self.synsets))
        return {"tags": self._nonzero(tag_rows), "synsets": self._nonzero(synset_rows)}, []

    @staticmethod
    def _nonzero(rows):
        import numpy as np

        hit = np.flatnonzero(rows)
        return hit.astype(np.uint32), rows[hit].astype(np.uint32)

    def add(self, counts: dict, sign: int = 1) -> None:
        """Add (sign -1: subtract) a unit's `counts` to the sums (the driver's side); a unit's
        indices are distinct."""
        for rows, (index, n) in ((self.tag_rows, counts["tags"]), (self.synset_rows, counts["synsets"])):
            rows[index] += n if sign > 0 else -n.astype(rows.dtype)

    def frames(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The sums as (name, count) frames, over the names counted at least once."""
        import numpy as np

        out = []
        for names, rows in ((self.tags, self.tag_rows), (self.synsets, self.synset_rows)):
            hit = np.flatnonzero(rows)
            out.append(pl.DataFrame({"name": names.gather(hit), "count": rows[hit]},
                                    schema={"name": pl.String, "count": pl.Int64}))
        return out[0], out[1]


_known_table: dict[tuple[str, str, str], Known] = {}


def _known(work: str, fingerprint: str, name: str = KNOWN_NAME) -> Known:
    """`_work/known.parquet` (the scan round's: the mapping cache) or `_work/tags.parquet` (the
    count round's: the build's distinct tags) as a `Known`, read once per process and build."""
    key = (work, fingerprint, name)
    if key not in _known_table:
        _known_table.clear()
        # ParquetFile: read_table imports pandas
        _known_table[key] = Known(pq.ParquetFile(io.BytesIO(read_bytes(storage.join(work, name)))).read())
    return _known_table[key]


def count_unit(task: UnitTask) -> dict:
    """Round 3 (module docstring). Returns `Known.count`'s arrays into `_work/tags.parquet` (every
    distinct tag of the build: the scan saw them all): over the unit's usable, non-duplicate rows,
    or (`dups_only`) over its duplicate rows alone. No Python object per tag: a dict of the build's
    mapped tags in every worker cost ~200 B a tag."""
    df, captions = _usable_text(task)
    keep = df["reason"].is_null()
    if task.exceptions:
        ex = exceptions_for(task.work, task.buckets, task.span.row0, task.span.row0 + task.span.rows)
        dup = df["row"].is_in(ex.filter(pl.col("reason") == "duplicate_key")["row"].implode())
        keep = keep & (dup if task.dups_only else ~dup)
    counts, missing = _known(task.work, task.fingerprint, TAGS_NAME).count(captions.filter(keep))
    if counts is None:  # a bug, not bad input: the scan round saw every tag of every unit
        raise RuntimeError(f"{task.name()}: hashtags missing from the build's tag table: {missing[:5]}")
    return counts


def _summed(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """(name, count) frames -> their sums per name, over the names with a count above 0 (the count
    round subtracts duplicate rows from what the scan counted)."""
    return pl.concat(frames).group_by("name").agg(pl.col("count").sum()).filter(pl.col("count") > 0)


class _Distinct:
    """The union of many tasks' tag Series, folded with polars every 250k entries (a Python set
    update per unit cost the driver more CPU than it can spare). Memory: O(distinct tags)."""

    def __init__(self):
        self.total = pl.Series("name", [], dtype=pl.String)
        self.pending: list[pl.Series] = []
        self.pending_rows = 0

    def add(self, tags: pl.Series) -> None:
        self.pending.append(tags)
        self.pending_rows += len(tags)
        if self.pending_rows > 250_000:
            self._fold()

    def _fold(self) -> None:
        if self.pending:
            self.total = pl.concat([self.total, *self.pending]).to_frame().lazy().unique().collect().to_series()
            self.pending, self.pending_rows = [], 0

    def result(self) -> pl.Series:
        self._fold()
        return self.total


# ---------------------------------------------------------------------------------------------
# The driver's side


@dataclass
class TextResult:
    """Columns, not Python objects: a dict entry and tuples per distinct tag cost the driver
    ~650 B a tag at its peak (tools/bench/tags_scale.py), which at 10^7 tags is GBs."""

    tags: pl.DataFrame  # every distinct tag seen: hashtag, count (usable non-duplicate rows; 0 when
    # it occurs only in duplicate rows), wnids (list, empty when unmapped), rule; sorted by hashtag
    synsets: pl.DataFrame  # wnid, count (rows with a tag mapped to it; > 0)
    buckets: int
    exceptions: bool  # the keys round found duplicates or renamed keys
    mapped_now: int  # tags mapped in this run (not found in the mapping cache)


def text_pass(plan: Plan, source: SourceConfig, work: str, fingerprint: str, runner, mapping_cfg,
              cache_dir: str | None) -> TextResult:
    """The three rounds (module docstring). Warm (every tag of a unit already in the mapping cache),
    the scan round counts as well and the count round runs only for the units that hold duplicates."""
    buckets = key_buckets(plan.rows)
    cached = load_mapping_cache(mapping_cfg, cache_dir)
    warm = 0 < cached.height <= WARM_MAX_TAGS
    known = None
    if warm:
        table = cached.select("hashtag", "wnids")  # sorted by hashtag; no copy
        known = Known(table)
        write_bytes(storage.join(work, KNOWN_NAME), _parquet_bytes(table), durable=False)
        del table
    units = [UnitTask(i, plan.files[s.file], s, source, work, buckets, fingerprint, warm=warm)
             for i, s in enumerate(plan.units)]
    seen = _Distinct()
    counted: set[int] = set()
    for task, res in runner.map(scan_unit, units, desc="text: scan", total_rows=plan.rows):
        if res["counts"] is None:
            seen.add(res["tags"])
        else:
            counted.add(task.unit)
            known.add(res["counts"])
    empty = pl.DataFrame(schema={"name": pl.String, "count": pl.Int64})
    scanned = known.frames() if counted else (empty, empty)  # (tags, synsets) the scan counted
    exceptions, dup_units = False, set()
    starts = tuple(u.row0 for u in plan.units)
    group = spill_group([u.rows for u in plan.units], buckets)
    if group > 1:
        for _ in runner.map(merge_spills, merge_tasks(work, len(units), buckets, group), desc="text: merge"):
            pass
    for _, res in runner.map(resolve_keys, [KeyTask(b, work, len(units), starts, group) for b in range(buckets)],
                             desc="text: keys"):
        exceptions |= bool(res["duplicates"] or res["renamed"])
        dup_units.update(res["dup_units"])
    distinct = pl.concat([seen.result(), scanned[0]["name"]])  # before round 3 subtracts duplicates: every tag seen
    mapping, mapped_now = map_tags(distinct, mapping_cfg, cache_dir, cached=cached, runner=runner)
    table = mapping.select("hashtag", "wnids")  # sorted by hashtag; no copy
    write_bytes(storage.join(work, TAGS_NAME), _parquet_bytes(table), durable=False)
    counting = Known(table)  # round 3's numbering: tag i is row i of the table shipped
    # counted in the scan: subtract their duplicate rows; not counted yet: count without them
    todo = [UnitTask(u.unit, u.file, u.span, source, work, buckets, fingerprint, exceptions,
                     dups_only=u.unit in counted) for u in units if u.unit not in counted or u.unit in dup_units]
    for task, res in runner.map(count_unit, todo, desc="text: count", total_rows=sum(t.rows for t in todo)):
        counting.add(res, -1 if task.dups_only else 1)
    counted_now = counting.frames() if todo else (empty, empty)  # a count may be negative: duplicates
    del counting
    counts = _summed([scanned[0], counted_now[0]]).rename({"name": "hashtag"})
    tags = mapping.join(counts, on="hashtag", how="left", maintain_order="left").select(
        "hashtag", pl.col("count").fill_null(0), "wnids", "rule")
    synsets = _summed([scanned[1], counted_now[1]]).rename({"name": "wnid"})
    return TextResult(tags, synsets, buckets, exceptions, mapped_now)


def _hashtag_table(tags: list[str], wnids: list) -> pa.Table:
    """(hashtag, wnids list) as Arrow, built from flat columns: a polars list column from Python
    lists is ~10x slower, and pa.array imports pandas (~0.5 s of the driver's serial time)."""
    import numpy as np

    lens = np.fromiter(map(len, wnids), np.int64, len(wnids))
    offsets = pl.Series(np.concatenate([[0], np.cumsum(lens)]), dtype=pl.Int64).to_arrow()
    flat = pl.Series([w for ws in wnids for w in ws], dtype=pl.String).to_arrow()
    return pa.table({"hashtag": pl.Series(tags, dtype=pl.String).to_arrow(),
                     "wnids": pa.LargeListArray.from_arrays(offsets, flat)})


def _parquet_bytes(data: pl.DataFrame | pa.Table) -> bytes:
    buf = io.BytesIO()
    if isinstance(data, pa.Table):
        pq.write_table(data, buf)
    else:
        data.write_parquet(buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Mapping, once per distinct tag, with a cache across builds


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "maws-data" / "hashtag-maps")


def mapping_key(mapping_cfg) -> str:
    """What a mapping depends on: the mapper's code, its configuration, the stop list's bytes."""
    from maws_data import wordnet

    stop = Path(mapping_cfg.stoplist_path).read_bytes() if mapping_cfg.stoplist_path else b""
    blob = json.dumps({"code": hashlib.sha256(Path(wordnet.__file__).read_bytes()).hexdigest(),
                       "stoplist": hashlib.sha256(stop).hexdigest() if mapping_cfg.stoplist_path else None,
                       "ambiguity": mapping_cfg.ambiguity, "segmentation": mapping_cfg.use_segmentation,
                       "extra": list(mapping_cfg.extra_stopwords), "min_length": mapping_cfg.min_length,
                       "max_segments": mapping_cfg.max_segments}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _cache_path(mapping_cfg, cache_dir: str | None, suffix: str = "") -> Path | None:
    if cache_dir == "":
        return None
    return Path(cache_dir or default_cache_dir()) / f"{mapping_key(mapping_cfg)}{suffix}.parquet"


CACHE_SCHEMA = {"hashtag": pl.String, "wnids": pl.List(pl.String), "rule": pl.String}


def load_mapping_cache(mapping_cfg, cache_dir: str | None) -> pl.DataFrame:
    """Every tag the cache holds for this mapping configuration: (hashtag, wnids, rule), sorted by
    hashtag. A frame, not a dict: a cache shared by many builds can hold far more tags than one
    build meets, and as Python objects each would cost the driver ~200 B."""
    path = _cache_path(mapping_cfg, cache_dir)
    if path is None or not path.is_file():
        return pl.DataFrame(schema=CACHE_SCHEMA)
    try:
        df = pl.read_parquet(path, columns=list(CACHE_SCHEMA)).cast(CACHE_SCHEMA)
        # written sorted (map_tags); sorting again would copy it, at its full size, for nothing
        return df if df["hashtag"].is_sorted() else df.sort("hashtag")
    except Exception:  # noqa: BLE001 - a broken cache is only a slower build
        return pl.DataFrame(schema=CACHE_SCHEMA)


@dataclass(frozen=True)
class MapTask:
    index: int
    tags: tuple[str, ...]  # up to MAP_TASK_TAGS new tags
    mapping: Any  # wordnet.MappingConfig

    @property
    def rows(self) -> int:
        return 0

    def name(self) -> str:
        return f"map tags {self.index} ({len(self.tags)} tags from {self.tags[0]!r})"


_mapper: dict = {}


def map_chunk(task: MapTask) -> dict:
    """Round 2b (many new tags only): `HashtagMapper.explain` for a slice of the tags no cache knew,
    and the names of the synsets they map to. Returns {"wnids": [...], "rules": [...]} in the
    task's tag order and {"names": {wnid: name}}, or {"error": why} when this worker cannot load
    WordNet (a Ray node without it): the driver then maps those tags itself."""
    from maws_data.wordnet import HashtagMapper, WordNetMissingError, synset_name

    try:
        if task.mapping not in _mapper:
            _mapper.clear()
            _mapper[task.mapping] = HashtagMapper(task.mapping)
    except WordNetMissingError as e:
        return {"error": str(e).splitlines()[0]}
    mapper = _mapper[task.mapping]
    explained = [mapper.explain(t) for t in task.tags]
    mapper.forget()  # the worker keeps WordNet, not the tags
    wnids = [tuple(w) for w, _ in explained]
    return {"wnids": wnids, "rules": [r for _, r in explained],
            "names": {w: synset_name(w) for w in sorted({w for ws in wnids for w in ws})}}


def _explain_all(todo: list[str], mapping_cfg, runner) -> tuple[dict[str, tuple[tuple[str, ...], str]], dict[str, str]]:
    """{tag: (wnids, rule)} for tags no cache knew, and the synset names found on the way: on the
    runner's workers when there are many (round 2b), else here."""
    from maws_data.wordnet import HashtagMapper

    out: dict[str, tuple[tuple[str, ...], str]] = {}
    names: dict[str, str] = {}
    left = todo
    if runner is not None and runner.workers > 1 and len(todo) >= MAP_MIN_TAGS:  # one process: map here
        # at least 4 tasks a worker, so that they finish together (a task is seconds of one core)
        per = max(1, min(MAP_TASK_TAGS, math.ceil(len(todo) / (4 * runner.workers))))
        tasks = [MapTask(i, tuple(todo[a:a + per]), mapping_cfg) for i, a in enumerate(range(0, len(todo), per))]
        left, why = [], ""
        for task, res in runner.map(map_chunk, tasks, desc="text: map"):
            if "error" in res:
                left.extend(task.tags)
                why = res["error"]
                continue
            out.update(zip(task.tags, zip(res["wnids"], res["rules"])))
            names.update(res["names"])
        runner.renew()  # the workers hold WordNet now; the rest of the build does not need it
        if left:
            print(f"text pass: {len(left)} of {len(todo)} new hashtags are mapped in the driver: a worker could "
                  f"not load WordNet ({why})", file=sys.stderr)
    if left:
        mapper = HashtagMapper(mapping_cfg)
        for t in left:
            w, rule = mapper.explain(t)
            out[t] = (tuple(w), rule)
    return out, names


def _cached_rows(cached: pl.DataFrame, tags: pl.Series) -> tuple[pl.DataFrame, list[str]]:
    """(the cache's rows of these sorted distinct tags, the tags it lacks), by binary search in the
    sorted cache: no hash table over either side, and the rows found come out sorted."""
    if not cached.height:
        return cached.clear(), tags.to_list()
    at = cached["hashtag"].search_sorted(tags).clip(upper_bound=cached.height - 1)
    found = cached["hashtag"].gather(at) == tags
    return cached[at.filter(found)], tags.filter(~found).to_list()


def map_tags(tags: Iterable[str] | pl.Series, mapping_cfg, cache_dir: str | None, *,
             cached: pl.DataFrame | None = None, runner=None) -> tuple[pl.DataFrame, int]:
    """(hashtag, wnids, rule) for every distinct tag given, sorted by hashtag, and how many had to
    be mapped now (not cached). `cache_dir` "" disables the cache; None is the default folder;
    `cached`: the cache, already loaded; `runner`: where to map many new tags (`_explain_all`).
    Columns throughout: only the tags mapped now become Python objects."""
    tags = pl.Series("hashtag", tags if isinstance(tags, pl.Series) else list(tags), dtype=pl.String).unique()
    cache_path = _cache_path(mapping_cfg, cache_dir)
    if cached is None:
        cached = load_mapping_cache(mapping_cfg, cache_dir)
    hit, todo = _cached_rows(cached, tags.sort())
    if not todo:
        return hit, 0
    explained, found_names = _explain_all(todo, mapping_cfg, runner)
    new = pl.DataFrame({"hashtag": todo, "wnids": [list(explained[t][0]) for t in todo],
                        "rule": [explained[t][1] for t in todo]}, schema=CACHE_SCHEMA)
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(str(cache_path), _parquet_bytes(pl.concat([cached, new]).sort("hashtag")))
        except OSError:
            pass  # a read-only home is only a slower next build
        # the names of the new tags' synsets too, while WordNet is loaded for the mapping: else a
        # later warm build whose larger counts lift another synset over min_count loads WordNet
        # (~3 s and ~150 MB of the driver) to name it
        synset_names({w for ws, _ in explained.values() for w in ws}, mapping_cfg, cache_dir, found=found_names)
    return pl.concat([hit, new]).sort("hashtag"), len(todo)


def synset_names(wnids: Iterable[str], mapping_cfg, cache_dir: str | None, *,
                 found: dict[str, str] | None = None) -> dict[str, str]:
    """wnid -> synset name ("dog.n.01"), through the same cache (filled by `map_tags` for every synset
    it maps to): a warm build never loads WordNet (reading it costs ~3-10 s and ~150 MB). `found`:
    names already looked up elsewhere (the mapping round's workers)."""
    from maws_data.wordnet import synset_name

    wnids = set(wnids)
    path = _cache_path(mapping_cfg, cache_dir, "-names")
    known: dict[str, str] = {}
    if path is not None and path.is_file():
        try:
            df = pl.read_parquet(path)
            known = dict(zip(df["wnid"].to_list(), df["name"].to_list()))
        except Exception:  # noqa: BLE001 - a broken cache is only a slower build
            known = {}
    fresh = {w: n for w, n in (found or {}).items() if w not in known}  # rewrite the cache only for news
    known.update(fresh)
    todo = sorted(wnids - known.keys())
    if todo or fresh:
        known.update((w, synset_name(w)) for w in todo)
        if path is not None:
            names = sorted(known)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_bytes(str(path), _parquet_bytes(pl.DataFrame({"wnid": names, "name": [known[w] for w in names]},
                                                                   schema={"wnid": pl.String, "name": pl.String})))
            except OSError:
                pass
    return {w: known[w] for w in wnids}
