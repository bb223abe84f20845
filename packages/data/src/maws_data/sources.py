"""Read the source table in bounded chunks: one row per input sample (key, image reference, caption).

A source is one of
  * a parquet / CSV / JSONL file, local or remote (`s3://bucket/key`, `http(s)://host/file`);
  * a folder or `s3://bucket/prefix` holding such files (found recursively, in sorted relative-path
    order, so row numbers are deterministic);
  * a glob of them (`data/part-*.parquet`, `s3://bucket/ig/**/*.parquet`), in sorted path order;
  * a Hugging Face `datasets` folder written by `save_to_disk` (`state.json` + `.arrow` files, read
    in `state.json`'s order); its parquet export is a folder of parquet files (above).
Column names are configurable.

`list_files(path)` names the files; `scan_file(file, cfg, step)` checks its columns and counts its
rows (parquet and arrow: from metadata / record-batch headers; CSV and JSONL: one streaming pass
that records the byte offset of every `step`-th row, so that any run of rows can later be read with
one range request); `read_rows(file, cfg, first, end, ...)` reads rows [first, end) of one file:
parquet reads only the row groups that overlap (the last one is cached per process, so consecutive
ranges of one row group decode it once), arrow walks record batches, CSV/JSONL read a byte range.
`read_source(cfg)` reads a whole (small) source into one frame, for tests and notebooks.

A chunk is a polars DataFrame with columns
    key       str   the source's key (ints are turned into strings), null when missing
    image     str | binary   as given: a path (relative to the file's folder), an http(s) URL, or raw
                    bytes (object dtype holding both, for an HF-datasets {bytes, path} column mixing them)
    caption   str   null when missing *or* not valid UTF-8 (see `problem`)
    problem   str   null, or a stable code for a row the reader could not read cleanly:
                    "caption_not_utf8", "key_not_utf8", "image_not_utf8", "bad_json_line"
`read_source` adds `row` (u64, 0..n-1 over all files) and `base_dir` (the file's folder).

File-level problems (missing file, unreadable file, missing column) raise `SourceError` naming the
file and what was expected. Row-level problems never raise: the row keeps its `problem` code so the
builder can skip it and count the reason. A null caption is not a problem: the image is kept, unlabeled.

Memory: O(rows of one chunk) (+ one cached parquet row group per process; + the byte offsets of a
CSV/JSONL file during its scan, O(rows / step)).
"""

from __future__ import annotations

import atexit
import csv
import glob as globlib
import io
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.ipc as pa_ipc
import pyarrow.parquet as pa_parquet

from maws_data import digests, storage

SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson")
FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".arrow": "arrow"}
COLUMNS = ("row", "key", "image", "caption", "base_dir", "problem")
CHUNK_COLUMNS = ("key", "image", "caption", "problem")
HF_STATE = "state.json"
JSONL_COLUMN_CHECK_LINES = 1000  # columns are checked on this many leading objects of a JSONL file


class SourceError(ValueError):
    """The source cannot be read at all (the CLI exits with code 2 and prints the message)."""


@dataclass(frozen=True)
class SourceConfig:
    path: str  # file, folder, glob, s3:// prefix, http(s):// file, or HF save_to_disk folder
    key_column: str = "key"
    image_column: str = "image"
    caption_column: str = "caption"

    @property
    def wanted(self) -> list[str]:
        cols = [self.key_column, self.image_column, self.caption_column]
        if len(set(cols)) != 3:
            raise SourceError(f"source {self.path}: key, image and caption columns must differ, got "
                              f"{self.key_column!r}, {self.image_column!r}, {self.caption_column!r}")
        return cols


@dataclass(frozen=True)
class SourceFile:
    url: str  # absolute local path or remote URL
    fmt: str  # parquet | csv | jsonl | arrow
    base_dir: str  # where relative image paths resolve: the file's folder


@dataclass(frozen=True)
class FileLayout:
    rows: int
    offsets: tuple[int, ...] = ()  # CSV/JSONL: byte offset of rows 0, step, 2*step, ..., then the end


# ---------------------------------------------------------------------------------------------
# Which files


def list_files(path: str | Path) -> list[SourceFile]:
    """The files a source stands for, in the deterministic order rows are numbered in."""
    path = str(path)
    fs, root = storage.filesystem(path)
    remote = storage.is_remote(path)
    if any(c in root for c in "*?["):
        found = sorted(fs.glob(root)) if remote else sorted(globlib.glob(root, recursive=True))
        files = [f for f in found if _suffix(f) in SUFFIXES and fs.isfile(f)]
        if not files:
            raise SourceError(f"source {path}: the glob matches no {'/'.join(SUFFIXES)} files")
        return [_source_file(fs, f, remote, path) for f in files]
    try:
        is_file = fs.isfile(root)
        is_dir = not is_file and fs.isdir(root)
    except OSError as e:
        raise SourceError(f"source {path}: cannot be listed ({type(e).__name__}: {e})") from e
    if is_file:
        if _suffix(root) not in SUFFIXES:
            raise SourceError(f"source {path}: unsupported file type {_suffix(root)!r}, expected one of {SUFFIXES}")
        return [_source_file(fs, root, remote, path)]
    if not is_dir:
        raise SourceError(f"source {path}: no such file or folder")
    if fs.isfile(posixpath.join(root, HF_STATE)):
        return _hf_files(fs, root, remote, path)
    found = [f for f in fs.find(root) if _suffix(f) in SUFFIXES]
    files = sorted(found, key=lambda f: posixpath.relpath(f, root) if remote else Path(f).relative_to(root).as_posix())
    if not files:
        raise SourceError(f"source folder {path}: contains no {'/'.join(SUFFIXES)} files")
    return [_source_file(fs, f, remote, path) for f in files]


def source_files(path: str | Path) -> list[SourceFile]:
    """Alias of `list_files` (older name)."""
    return list_files(path)


def _suffix(name: str) -> str:
    return posixpath.splitext(name)[1].lower()


def _source_file(fs, name: str, remote: bool, source: str) -> SourceFile:
    if remote:
        url = fs.unstrip_protocol(name) if not name.startswith(("http://", "https://")) else name
        return SourceFile(url=url, fmt=FORMATS[_suffix(name)], base_dir=url.rsplit("/", 1)[0])
    p = Path(name).resolve()
    return SourceFile(url=str(p), fmt=FORMATS[_suffix(name)], base_dir=str(p.parent))


def _hf_files(fs, root: str, remote: bool, source: str) -> list[SourceFile]:
    """A `datasets.Dataset.save_to_disk` folder: its arrow files, in `state.json` order."""
    try:
        state = json.loads(fs.cat_file(posixpath.join(root, HF_STATE)))
        names = [d["filename"] for d in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise SourceError(f"source {source}: {HF_STATE} is not a datasets save_to_disk state ({e}); "
                          "for a DatasetDict, pass one split's folder") from e
    out = []
    for name in names:
        f = _source_file(fs, posixpath.join(root, name) if remote else str(Path(root) / name), remote, source)
        out.append(SourceFile(url=f.url, fmt="arrow", base_dir=f.base_dir))
    if not out:
        raise SourceError(f"source {source}: {HF_STATE} lists no data files")
    return out


def file_identity(f: SourceFile, known: digests.Entry | None = None) -> tuple[dict, digests.Entry | None]:
    """What the build fingerprint records of an input file: local files by sha256 of their bytes,
    remote ones by size and ETag / modification time (hashing a bucket would mean downloading it).
    Also the digest entry to remember for a local file (`maws_data.digests`: `known`, the one
    remembered by an earlier build, spares the hashing while the file's stat is unchanged)."""
    if not storage.is_remote(f.url):
        sha, entry = digests.digest(f.url, known)
        return {"path": f.url, "sha256": sha, "bytes": entry[0][2] if entry else Path(f.url).stat().st_size}, entry
    fs, path = storage.filesystem(f.url)
    info = fs.info(path)
    tag = info.get("ETag") or info.get("etag") or str(info.get("LastModified") or info.get("mtime") or "")
    return {"path": f.url, "sha256": None, "etag": str(tag).strip('"'), "bytes": int(info.get("size") or 0)}, None


# ---------------------------------------------------------------------------------------------
# Scanning one file: columns and row count (+ byte offsets for CSV/JSONL)


def scan_file(f: SourceFile, cfg: SourceConfig, step: int) -> FileLayout:
    """Check the file has the configured columns and count its rows (see module docstring)."""
    wanted = cfg.wanted
    try:
        if f.fmt == "parquet":
            pf = _parquet_file(f.url)
            _check_columns(f.url, pf.schema_arrow.names, wanted)
            return FileLayout(rows=pf.metadata.num_rows)
        if f.fmt == "arrow":
            reader = _arrow_reader(f.url)
            _check_columns(f.url, reader.schema.names, wanted)
            return FileLayout(rows=sum(b.num_rows for b in reader))
        if f.fmt == "csv":
            return _scan_csv(f, wanted, step)
        return _scan_jsonl(f, wanted, step)
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"source file {f.url}: cannot be read ({type(e).__name__}: {e})") from e


def _check_columns(name: str, have: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in have]
    if missing:
        raise SourceError(f"source file {name}: missing column(s) {missing}; it has {have} "
                          "(set the column names with --key-column/--image-column/--caption-column)")


def _open(url: str):
    if url.startswith(("http://", "https://")):
        return open(_http_copy(url), "rb")
    fs, path = storage.filesystem(url)
    return fs.open(path, "rb")


_http_copies: dict[str, str] = {}


def _http_copy(url: str) -> str:
    """A local copy of an http(s) source file, fetched once per process: many web servers do not
    answer range requests, and a source file given by URL is one file, not a corpus."""
    if url not in _http_copies:
        import tempfile

        fs, path = storage.filesystem(url)
        fd, local = tempfile.mkstemp(prefix="maws-source-", suffix=_suffix(url))
        os.close(fd)
        atexit.register(Path(local).unlink, missing_ok=True)
        fs.get_file(path, local)
        _http_copies[url] = local
    return _http_copies[url]


def _scan_csv(f: SourceFile, wanted: list[str], step: int) -> FileLayout:
    # Record boundaries with Python's csv module over latin-1 text (one byte = one character, so
    # positions are byte offsets; quotes, commas and newlines are ASCII). Captions often hold line
    # breaks inside quoted cells, so lines are not rows.
    with _open(f.url) as fh:
        header = fh.readline()
        pos = len(header)
        have = next(csv.reader([header.decode("utf-8", errors="replace").lstrip("\ufeff")]), [])
        _check_columns(f.url, have, wanted)
        offsets, rows = [], 0

        def lines():
            nonlocal pos
            for line in fh:
                pos += len(line)
                yield line.decode("latin-1")

        start = pos
        reader = csv.reader(lines())
        for rec in reader:
            if rec:
                if rows % step == 0:
                    offsets.append(start)
                rows += 1
            start = pos
        offsets.append(pos)
    return FileLayout(rows=rows, offsets=tuple(offsets))


def _scan_jsonl(f: SourceFile, wanted: list[str], step: int) -> FileLayout:
    offsets, rows, pos = [], 0, 0
    seen: set[str] = set()
    with _open(f.url) as fh:
        for line in fh:
            if line.strip():
                if rows % step == 0:
                    offsets.append(pos)
                if rows < JSONL_COLUMN_CHECK_LINES:
                    try:
                        obj = json.loads(line.decode("utf-8", errors="surrogateescape").lstrip("\ufeff"))
                        seen.update(obj if isinstance(obj, dict) else ())
                    except ValueError:
                        pass
                rows += 1
            pos += len(line)
    offsets.append(pos)
    if rows:
        _check_columns(f.url, sorted(seen), wanted)
    return FileLayout(rows=rows, offsets=tuple(offsets))


# ---------------------------------------------------------------------------------------------
# Reading rows [first, end) of one file


_parquet_cache: dict[str, pa_parquet.ParquetFile] = {}
_row_group_cache: dict = {}  # one entry: (url, row group, columns) -> table


def _parquet_file(url: str) -> pa_parquet.ParquetFile:
    pf = _parquet_cache.get(url)
    if pf is None:
        if len(_parquet_cache) >= 8:  # a worker moves from file to file: keep only a few open
            _parquet_cache.pop(next(iter(_parquet_cache)))
        local = url if not storage.is_remote(url) else _http_copy(url) if url.startswith("http") else None
        pf = _parquet_cache[url] = pa_parquet.ParquetFile(local or _open(url))
    return pf


def _arrow_reader(url: str):
    local = url if not storage.is_remote(url) else _http_copy(url) if url.startswith("http") else None
    source = pa.memory_map(local) if local else _open(url)
    try:
        return pa_ipc.open_stream(source)  # datasets' save_to_disk writes the IPC stream format
    except pa.ArrowInvalid:
        return pa_ipc.open_file(source)


def read_rows(f: SourceFile, cfg: SourceConfig, first: int, end: int, *, byte_range: tuple[int, int] | None = None,
              text_only: bool = False) -> pl.DataFrame:
    """Rows [first, end) of file `f` as a chunk (module docstring); `byte_range` (CSV/JSONL) is the
    range the plan recorded for these rows. `text_only` may leave the image column null when it
    cannot make a row a problem (parquet, arrow), so the text pass never reads image bytes."""
    wanted = cfg.wanted
    try:
        if f.fmt == "parquet":
            raw = _read_parquet(f.url, wanted, first, end, text_only)
        elif f.fmt == "arrow":
            raw = _read_arrow(f.url, wanted, first, end, text_only)
        elif f.fmt == "csv":
            raw = _read_csv(f.url, wanted, _need_range(f, byte_range))
        else:
            raw = _read_jsonl(_read_range(f.url, _need_range(f, byte_range)), wanted)
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"source file {f.url}: cannot be read ({type(e).__name__}: {e})") from e
    if raw.height != end - first:
        raise SourceError(f"source file {f.url}: rows {first}..{end} gave {raw.height} rows; "
                          "did the file change during the build?")
    return raw


def _need_range(f: SourceFile, byte_range):
    if byte_range is None:
        raise ValueError(f"{f.url}: CSV/JSONL rows are read by byte range (from scan_file)")
    return byte_range


def _read_range(url: str, byte_range: tuple[int, int]) -> bytes:
    with _open(url) as fh:
        fh.seek(byte_range[0])
        return fh.read(byte_range[1] - byte_range[0])


def _project(wanted: list[str], text_only: bool) -> list[str]:
    key, _image, caption = wanted
    return [key, caption] if text_only else wanted


def _with_null_image(table: pa.Table, wanted: list[str]) -> pa.Table:
    if wanted[1] in table.column_names:
        return table
    return table.append_column(wanted[1], pa.nulls(table.num_rows, pa.string()))


def _read_parquet(url: str, wanted: list[str], first: int, end: int, text_only: bool) -> pl.DataFrame:
    pf = _parquet_file(url)
    cols = _project(wanted, text_only)
    _check_columns(url, pf.schema_arrow.names, wanted)
    if text_only and not storage.is_remote(url) and all(_is_text(pf.schema_arrow.field(c).type) for c in cols):
        return _read_text_natively(url, wanted, first, end)
    parts, start = [], 0
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        lo, hi = max(first, start), min(end, start + n)
        if lo < hi:
            parts.append(_row_group(pf, url, rg, cols).slice(lo - start, hi - lo))
        start += n
        if start >= end:
            break
    table = pa.concat_tables(parts) if parts else pf.schema_arrow.empty_table().select(cols)
    return _from_arrow(_with_null_image(table, wanted), wanted, image_is_text=False)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _read_text_natively(url: str, wanted: list[str], first: int, end: int) -> pl.DataFrame:
    """The text pass's chunk of a local parquet file whose key and caption are strings, read by
    polars' own reader: the same frame as through Arrow (strings are never a row problem, and the
    image column is not read), without converting every string to polars' layout, which cost
    ~0.09 us a row, a third of the read (4-5% of a 1-process text pass)."""
    key, _image, caption = wanted
    df = (pl.scan_parquet(url, glob=False, hive_partitioning=False).slice(first, end - first)
          .select(pl.col(key).alias("key"), pl.col(caption).alias("caption")).collect())
    return df.select("key", pl.lit(None, pl.String).alias("image"), "caption", pl.lit(None, pl.String).alias("problem"))


def _row_group(pf: pa_parquet.ParquetFile, url: str, rg: int, cols: list[str]) -> pa.Table:
    key = (url, rg, tuple(cols))
    if key not in _row_group_cache:
        _row_group_cache.clear()
        _row_group_cache[key] = pf.read_row_group(rg, columns=cols)
    return _row_group_cache[key]


def _read_arrow(url: str, wanted: list[str], first: int, end: int, text_only: bool) -> pl.DataFrame:
    cols = _project(wanted, text_only)
    reader = _arrow_reader(url)
    _check_columns(url, reader.schema.names, wanted)
    parts, start = [], 0
    for batch in reader:
        n = batch.num_rows
        lo, hi = max(first, start), min(end, start + n)
        if lo < hi:
            parts.append(pa.Table.from_batches([batch.select(cols).slice(lo - start, hi - lo)]))
        start += n
        if start >= end:
            break
    table = pa.concat_tables(parts) if parts else reader.schema.empty_table().select(cols)
    return _from_arrow(_with_null_image(table, wanted), wanted, image_is_text=False)


def _read_csv(url: str, wanted: list[str], byte_range: tuple[int, int]) -> pl.DataFrame:
    # Every column is read as binary: a CSV with bad bytes in one caption must not sink the whole
    # file; the bytes are decoded in _text_column and bad cells become row problems.
    with _open(url) as fh:
        header = fh.readline()
    names = next(csv.reader([header.decode("utf-8", errors="replace").lstrip("\ufeff")]), [])
    _check_columns(url, names, wanted)
    body = _read_range(url, byte_range)
    table = pa_csv.read_csv(io.BytesIO(body), read_options=pa_csv.ReadOptions(column_names=names),
                            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                            convert_options=pa_csv.ConvertOptions(
                                include_columns=wanted, column_types={c: pa.binary() for c in wanted},
                                strings_can_be_null=False))
    # CSV cannot tell null from empty: an empty caption stays "" (a valid, empty caption), while an
    # empty key or image cell means "missing" (null), as in the other formats.
    df = _from_arrow(table, wanted, image_is_text=True)
    return df.with_columns(pl.when(pl.col(c) != "").then(pl.col(c)).alias(c) for c in ("key", "image"))


def _read_jsonl(data: bytes, wanted: list[str]) -> pl.DataFrame:
    # JSON per line, in Python: one unparseable line or non-UTF-8 string must become one bad row,
    # not an exception for the whole file (polars' ndjson reader fails the file).
    out: dict[str, list] = {c: [] for c in ("key", "image", "caption")}
    problems: list[str | None] = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8", errors="surrogateescape").lstrip("\ufeff"))  # BOM
        except ValueError:
            obj = None
        if not isinstance(obj, dict):  # unparseable, or valid JSON that is not an object
            obj, problem = {}, "bad_json_line"
        else:
            problem = None
        for name, col in zip(("key", "image", "caption"), wanted):
            v = obj.get(col)
            if isinstance(v, str):
                try:
                    v.encode("utf-8")  # lone surrogates = bytes that were not UTF-8
                except UnicodeEncodeError:
                    v, problem = None, problem or f"{name}_not_utf8"
            elif v is not None and not isinstance(v, (int, float)):
                v = json.dumps(v)
            out[name].append(None if v is None else str(v))
        problems.append(problem)
    df = pl.DataFrame({c: pl.Series(c, v, dtype=pl.String) for c, v in out.items()})
    return df.with_columns(pl.Series("problem", problems, dtype=pl.String))


def _from_arrow(table: pa.Table, wanted: list[str], *, image_is_text: bool) -> pl.DataFrame:
    """Arrow table -> (key, image, caption, problem); `image_is_text` for CSV, whose cells arrive as binary."""
    key, image, caption = wanted
    cols: dict[str, pl.Series] = {}
    problems = _Problems(table.num_rows)
    for name, col, code in (("key", key, "key_not_utf8"), ("caption", caption, "caption_not_utf8")):
        cols[name] = _text_column(table.column(col), code, problems)
    img = _plain(table.column(image))
    if pa.types.is_struct(img.type):  # HF datasets Image feature: {"bytes": binary, "path": str}
        values = [None if v is None else (v.get("bytes") or v.get("path")) for v in img.to_pylist()]
        kinds = {type(v) for v in values if v is not None}
        # bytes for some rows and paths for others cannot share a typed column: keep Python objects
        dtype = pl.Object if len(kinds) > 1 else pl.Binary if bytes in kinds else pl.String
        cols["image"] = pl.Series("image", values, dtype=dtype)
    elif (pa.types.is_binary(img.type) or pa.types.is_large_binary(img.type)) and not image_is_text:
        cols["image"] = pl.Series("image", img.combine_chunks() if img.num_chunks else img).cast(pl.Binary)
    else:
        cols["image"] = _text_column(img, "image_not_utf8", problems)
    df = pl.DataFrame([cols[c].alias(c) for c in ("key", "image", "caption")])
    return df.with_columns(problems.series())


class _Problems:
    """Per-row problem codes, allocated only when a column actually needs decoding (text columns
    stored as strings never do: building a list of 100k Nones per chunk is most of a chunk's cost)."""

    def __init__(self, n: int):
        self.n = n
        self.codes: list[str | None] | None = None

    def __getitem__(self, i: int) -> str | None:
        return None if self.codes is None else self.codes[i]

    def __setitem__(self, i: int, code: str | None) -> None:
        if self.codes is None:
            self.codes = [None] * self.n
        self.codes[i] = code

    def series(self) -> pl.Series:
        if self.codes is None:
            return pl.repeat(None, self.n, dtype=pl.String, eager=True).alias("problem")
        return pl.Series("problem", self.codes, dtype=pl.String)


def _plain(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dictionary-encoded and view columns as their plain string/binary type."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if getattr(pa.types, "is_string_view", lambda t: False)(col.type):
        col = col.cast(pa.large_string())
    if getattr(pa.types, "is_binary_view", lambda t: False)(col.type):
        col = col.cast(pa.large_binary())
    return col


def _text_column(col: pa.ChunkedArray, code: str, problems) -> pl.Series:
    """A column as strings; values that are not valid UTF-8 become null and mark the row's problem."""
    col = _plain(col)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pl.Series(values=col.combine_chunks() if col.num_chunks else col).cast(pl.String)
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        values = col.to_pylist()
        out: list[str | None] = []
        for i, v in enumerate(values):
            if v is None:
                out.append(None)
                continue
            try:
                out.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(None)
                problems[i] = problems[i] or code
        return pl.Series(values=out, dtype=pl.String)
    if pa.types.is_null(col.type):
        return pl.Series(values=[None] * len(col), dtype=pl.String)
    # numbers (integer keys) and anything else printable
    return pl.Series(values=[None if v is None else str(v) for v in col.to_pylist()], dtype=pl.String)


# ---------------------------------------------------------------------------------------------
# A whole small source in one frame


def read_source(cfg: SourceConfig) -> pl.DataFrame:
    """All rows of the source, numbered 0..n-1 (columns COLUMNS). Holds the whole table: small sources only."""
    frames = []
    for f in list_files(cfg.path):
        layout = scan_file(f, cfg, step=1 << 62)
        rng = (layout.offsets[0], layout.offsets[-1]) if layout.offsets else None
        df = read_rows(f, cfg, 0, layout.rows, byte_range=rng)
        frames.append(df.with_columns(pl.lit(f.base_dir, dtype=pl.String).alias("base_dir")))
    image_types = {str(df.schema["image"]) for df in frames if df.schema["image"] != pl.Null}
    if len(image_types) > 1:
        raise SourceError(f"source {cfg.path}: files disagree on the type of image column "
                          f"{cfg.image_column!r} ({sorted(image_types)}); use paths/URLs or bytes in all files")
    df = pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]
    df = df.with_row_index("row").with_columns(pl.col("row").cast(pl.UInt64))
    return df.select(COLUMNS)
