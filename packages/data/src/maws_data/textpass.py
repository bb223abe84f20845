"""Stage 2 of the build, the text pass: row checks, hashtags, unique keys, mapping, counts.

It runs on the same runner as the images (local processes or Ray), in three rounds of small tasks,
each reading its own rows; the driver only merges per-task results:

1. scan (one task per text unit): read key + caption, check every row (a reader problem, then a
   null key), extract the hashtags of the usable rows, return the unit's DISTINCT tags, and write the
   usable rows' (row, key, safe key) to `_work/keys/unit-NNNNNN.parquet`, one row group per key bucket.
2. keys (one task per bucket): key uniqueness without a global in-memory set. Rows are partitioned
   by a hash of their webdataset-safe key into B buckets (B = rows / KEYS_PER_BUCKET, rounded up),
   so every pair of rows that could clash -- the same source key, or two keys that sanitise to the
   same safe key -- meets in one bucket. In row order there: a source key seen before makes the later
   row `duplicate_key` (skipped; detail names the first row), and a safe key taken by an earlier row
   gets `_r<row>` appended. Only these exceptions are written (`_work/keys/bucket-BBBB.parquet`,
   sorted by row); most builds have none, and then nothing is read back.
   (The one clash this cannot see: a suffixed key `x_r27` equal to another row's own key `x_r27`.)
3. count (one task per text unit, after the driver mapped every distinct hashtag ONCE, reusing the
   mapping cache): rows per hashtag and rows per synset (a row counts once per synset any of its
   tags maps to), over the rows that passed the checks and are not duplicates.

The driver maps tags with `maws_data.wordnet.HashtagMapper`; a mapping cache (a parquet file per
mapping configuration, under `mapping_cache`, default ~/.cache/maws-data/hashtag-maps) keeps every
tag it has mapped, so a rerun, a resume or a larger build only maps tags it has never seen.

Memory: a worker holds one text unit (or one key bucket); the driver holds the distinct hashtags and
their counts, and the synset counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from maws_data import storage
from maws_data.hashtags import distinct_tags, mine_series
from maws_data.manifest import read_bytes, write_bytes
from maws_data.plan import Plan, Span
from maws_data.sources import SourceConfig, SourceFile, read_rows

KEY_MAX_LEN = 64  # tar USTAR names hold 100 bytes; leave room for ".json" and margin
UNSAFE_KEY_PATTERN = r"[^A-Za-z0-9_-]"
KEYS_PER_BUCKET = 2_000_000  # rows per key bucket: bounds the memory of one keys task (~250 MB)
WORK_DIR = "_work"
TAGS_NAME = "tags.parquet"


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


def _unit_url(work: str, unit: int) -> str:
    return storage.join(work, "keys", f"unit-{unit:06d}.parquet")


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
    """Round 1 (module docstring). Returns {"tags": distinct hashtags, "usable": rows}."""
    df, captions = _usable_text(task)
    usable = df.filter(pl.col("reason").is_null()).select("row", "key")
    usable = usable.with_columns(safe_keys(usable["key"]).alias("safe"))
    usable = usable.with_columns(_bucket_of(usable["safe"], task.buckets).alias("bucket"))
    buf = io.BytesIO()
    present = sorted(set(usable["bucket"].to_list())) if task.buckets > 1 else [0]
    schema = pa.schema([("row", pa.uint64()), ("key", pa.large_string()), ("safe", pa.large_string())],
                       metadata={"buckets": json.dumps(present)})
    with pq.ParquetWriter(buf, schema) as w:
        for b in present:
            part = usable.filter(pl.col("bucket") == b) if task.buckets > 1 else usable
            w.write_table(part.select("row", "key", "safe").to_arrow().cast(schema), row_group_size=1 << 30)
    write_bytes(_unit_url(task.work, task.unit), buf.getvalue())
    return {"tags": sorted(distinct_tags(captions)), "usable": usable.height}


# ---------------------------------------------------------------------------------------------
# Round 2: keys


@dataclass(frozen=True)
class KeyTask:
    bucket: int
    work: str
    units: int

    @property
    def rows(self) -> int:
        return 0

    def name(self) -> str:
        return f"key bucket {self.bucket}"


def resolve_keys(task: KeyTask) -> dict:
    """Round 2 (module docstring). Returns {"duplicates": n, "renamed": n}."""
    parts = []
    for u in range(task.units):
        pf = pq.ParquetFile(parquet_source(_unit_url(task.work, u)))
        present = json.loads(pf.schema_arrow.metadata[b"buckets"])
        if task.bucket in present and pf.metadata.num_row_groups:
            parts.append(pl.from_arrow(pf.read_row_group(present.index(task.bucket))))
    df = pl.concat(parts).sort("row") if parts else pl.DataFrame(
        schema={"row": pl.UInt64, "key": pl.String, "safe": pl.String})
    first = df["key"].is_first_distinct()
    dups = df.filter(~first).join(df.filter(first).select("key", pl.col("row").alias("first")), on="key")
    dups = dups.select("row", pl.lit("duplicate_key").alias("reason"), pl.lit(None, pl.String).alias("key"),
                       pl.Series("detail", [f"key {k!r} already used by row {r}"
                                            for k, r in zip(dups["key"].to_list(), dups["first"].to_list())],
                                 dtype=pl.String))
    kept = df.filter(first)
    renamed = kept.filter(~kept["safe"].is_first_distinct()).select(
        "row", pl.lit(None, pl.String).alias("reason"),
        (pl.col("safe") + "_r" + pl.col("row").cast(pl.String)).alias("key"), pl.lit(None, pl.String).alias("detail"))
    out = pl.concat([_empty_exceptions(), dups.cast(_empty_exceptions().schema),
                     renamed.cast(_empty_exceptions().schema)]).sort("row")
    buf = io.BytesIO()
    pq.write_table(out.to_arrow(), buf, row_group_size=65536)
    write_bytes(_bucket_url(task.work, task.bucket), buf.getvalue())
    return {"duplicates": dups.height, "renamed": renamed.height}


# ---------------------------------------------------------------------------------------------
# Round 3: counts


_tag_table: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {}


def _tags_of(work: str, fingerprint: str) -> dict[str, tuple[str, ...]]:
    """hashtag -> wnids of every mapped tag, read once per process and build."""
    key = (work, fingerprint)
    if key not in _tag_table:
        _tag_table.clear()
        df = pl.read_parquet(io.BytesIO(read_bytes(storage.join(work, TAGS_NAME))))
        _tag_table[key] = dict(zip(df["hashtag"].to_list(), map(tuple, df["wnids"].to_list())))
    return _tag_table[key]


def count_unit(task: UnitTask) -> dict:
    """Round 3 (module docstring). Returns {"tags": {tag: rows}, "synsets": {wnid: rows}}."""
    df, captions = _usable_text(task)
    keep = df["reason"].is_null()
    if task.exceptions:
        ex = exceptions_for(task.work, task.buckets, task.span.row0, task.span.row0 + task.span.rows)
        dup_rows = ex.filter(pl.col("reason") == "duplicate_key")["row"]
        keep = keep & ~df["row"].is_in(dup_rows.implode())
    table = _tags_of(task.work, task.fingerprint)
    # one regex pass and one distinct-chunk table give both the tags and the synsets of every row
    mined = mine_series(captions.filter(keep), {"wnids": lambda t: table.get(t, ())})
    tag_counts = mined["hashtags"].explode().drop_nulls().value_counts()
    syn_counts = mined["wnids"].explode().drop_nulls().value_counts()
    return {"tags": dict(zip(*(tag_counts[c].to_list() for c in tag_counts.columns))),
            "synsets": dict(zip(*(syn_counts[c].to_list() for c in syn_counts.columns)))}


# ---------------------------------------------------------------------------------------------
# The driver's side


@dataclass
class TextResult:
    tag_counts: dict[str, int]  # rows per hashtag (usable, non-duplicate rows)
    synset_counts: dict[str, int]  # rows per synset
    mapping: dict[str, tuple[tuple[str, ...], str]]  # every distinct tag -> (wnids, rule)
    buckets: int
    exceptions: bool  # the keys round found duplicates or renamed keys
    mapped_now: int  # tags mapped in this run (not found in the mapping cache)


def text_pass(plan: Plan, source: SourceConfig, work: str, fingerprint: str, runner, mapping_cfg,
              cache_dir: str | None) -> TextResult:
    buckets = key_buckets(plan.rows)
    units = [UnitTask(i, plan.files[s.file], s, source, work, buckets, fingerprint) for i, s in enumerate(plan.units)]
    distinct: set[str] = set()
    for _, res in runner.map(scan_unit, units, desc="text: scan", total_rows=plan.rows):
        distinct.update(res["tags"])
    exceptions = False
    for _, res in runner.map(resolve_keys, [KeyTask(b, work, len(units)) for b in range(buckets)], desc="text: keys"):
        exceptions |= bool(res["duplicates"] or res["renamed"])
    mapping, mapped_now = map_tags(distinct, mapping_cfg, cache_dir)
    mapped = sorted(t for t in distinct if mapping[t][0])
    write_bytes(storage.join(work, TAGS_NAME), _parquet_bytes(pl.DataFrame(
        {"hashtag": mapped, "wnids": [list(mapping[t][0]) for t in mapped]},
        schema={"hashtag": pl.String, "wnids": pl.List(pl.String)})))
    tag_counts: Counter = Counter()
    synset_counts: Counter = Counter()
    counting = (UnitTask(u.unit, u.file, u.span, source, work, buckets, fingerprint, exceptions) for u in units)
    for _, res in runner.map(count_unit, counting, desc="text: count", total_rows=plan.rows):
        tag_counts.update(res["tags"])
        synset_counts.update(res["synsets"])
    return TextResult(dict(tag_counts), dict(synset_counts), {t: mapping[t] for t in distinct}, buckets,
                      exceptions, mapped_now)


def _parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf)
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


def map_tags(tags: Iterable[str], mapping_cfg, cache_dir: str | None
             ) -> tuple[dict[str, tuple[tuple[str, ...], str]], int]:
    """{tag: (wnids, rule)} for every tag given, and how many had to be mapped now (not cached).
    `cache_dir` "" disables the cache; None is the default folder."""
    from maws_data.wordnet import HashtagMapper

    tags = set(tags)
    cache_path = None if cache_dir == "" else Path(cache_dir or default_cache_dir()) / f"{mapping_key(mapping_cfg)}.parquet"
    cached: dict[str, tuple[tuple[str, ...], str]] = {}
    if cache_path is not None and cache_path.is_file():
        try:
            df = pl.read_parquet(cache_path)
            cached = {t: (tuple(w), r) for t, w, r in zip(df["hashtag"].to_list(), df["wnids"].to_list(),
                                                         df["rule"].to_list())}
        except Exception:  # noqa: BLE001 - a broken cache is only a slower build
            cached = {}
    todo = sorted(tags - cached.keys())
    out = {t: cached[t] for t in tags if t in cached}
    if todo:
        mapper = HashtagMapper(mapping_cfg)
        for t in todo:
            w, rule = mapper.explain(t)
            out[t] = (tuple(w), rule)
        if cache_path is not None:
            merged = {**cached, **{t: out[t] for t in todo}}
            names = sorted(merged)
            frame = pl.DataFrame({"hashtag": names, "wnids": [list(merged[t][0]) for t in names],
                                  "rule": [merged[t][1] for t in names]},
                                 schema={"hashtag": pl.String, "wnids": pl.List(pl.String), "rule": pl.String})
            try:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                write_bytes(str(cache_path), _parquet_bytes(frame))
            except OSError:
                pass  # a read-only home is only a slower next build
    return out, len(todo)


def synset_names(wnids: Iterable[str], mapping_cfg, cache_dir: str | None) -> dict[str, str]:
    """wnid -> synset name ("dog.n.01"), through the same cache: a warm build never loads WordNet
    (reading it costs ~10 s and ~150 MB)."""
    from maws_data.wordnet import synset_name

    wnids = set(wnids)
    path = None if cache_dir == "" else Path(cache_dir or default_cache_dir()) / f"{mapping_key(mapping_cfg)}-names.parquet"
    known: dict[str, str] = {}
    if path is not None and path.is_file():
        try:
            df = pl.read_parquet(path)
            known = dict(zip(df["wnid"].to_list(), df["name"].to_list()))
        except Exception:  # noqa: BLE001 - a broken cache is only a slower build
            known = {}
    todo = sorted(wnids - known.keys())
    if todo:
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
