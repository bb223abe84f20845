"""Read the source table: one row per input sample (key, image reference, caption).

A source is a parquet file, a CSV file, a JSONL file, or a folder holding any of them (read
recursively, in sorted relative-path order so that row numbers are deterministic). Column names are
configurable. The result is one polars DataFrame with a fixed schema:

    row       u64   0..n-1 over all files, in file-sorted order (the builder's stable row id)
    key       str   the source's key (ints are turned into strings), null when missing
    image     str | binary   as given: a path (relative to `base_dir`), an http(s) URL, or raw bytes
                    (object dtype holding both, for an HF-datasets {bytes, path} column mixing them)
    caption   str   null when missing *or* not valid UTF-8 (see `problem`)
    base_dir  str   absolute folder of the file the row came from (relative paths resolve there)
    problem   str   null, or a stable code for a row the reader could not read cleanly:
                    "caption_not_utf8", "key_not_utf8", "image_not_utf8", "bad_json_line"

File-level problems (missing file, unreadable file, missing column, files that disagree on the image
column's type) raise `SourceError` naming the file and what was expected. Row-level problems never
raise: the row is kept with its `problem` code so the builder can skip it and count the reason
(`caption_problem(row)` gives the reason a row's caption cannot be used).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet

SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson")
COLUMNS = ("row", "key", "image", "caption", "base_dir", "problem")


class SourceError(ValueError):
    """The source cannot be read at all (the CLI exits with code 1 and prints the message)."""


@dataclass(frozen=True)
class SourceConfig:
    path: str  # parquet/csv/jsonl file, or a folder of them
    key_column: str = "key"
    image_column: str = "image"
    caption_column: str = "caption"


def source_files(path: str | Path) -> list[Path]:
    """The files a source path stands for, in the deterministic order rows are numbered in."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"source {p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() not in SUFFIXES:
            raise SourceError(f"source {p}: unsupported file type {p.suffix!r}, expected one of {SUFFIXES}")
        return [p]
    files = sorted((f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES),
                   key=lambda f: f.relative_to(p).as_posix())
    if not files:
        raise SourceError(f"source folder {p}: contains no {'/'.join(SUFFIXES)} files")
    return files


def read_source(cfg: SourceConfig) -> pl.DataFrame:
    """All rows of the source, numbered 0..n-1, with the schema in the module docstring."""
    frames = [_read_file(f, cfg) for f in source_files(cfg.path)]
    image_types = {str(df.schema["image"]) for df in frames if df.schema["image"] != pl.Null}
    if len(image_types) > 1:
        raise SourceError(f"source {cfg.path}: files disagree on the type of image column "
                          f"{cfg.image_column!r} ({sorted(image_types)}); use paths/URLs or bytes in all files")
    df = pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]
    df = df.with_row_index("row").with_columns(pl.col("row").cast(pl.UInt64))
    return df.select(COLUMNS)


def caption_problem(row: dict) -> str | None:
    """Why a row's caption cannot be used (a skip reason), or None when it is fine.

    A null caption is reported as "null_caption"; an empty string is a valid (empty) caption.
    """
    if row.get("problem"):
        return row["problem"]
    if row.get("caption") is None:
        return "null_caption"
    return None


def _read_file(path: Path, cfg: SourceConfig) -> pl.DataFrame:
    wanted = {cfg.key_column: "key", cfg.image_column: "image", cfg.caption_column: "caption"}
    if len(wanted) != 3:
        raise SourceError(f"source {cfg.path}: key, image and caption columns must differ, got "
                          f"{cfg.key_column!r}, {cfg.image_column!r}, {cfg.caption_column!r}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            raw = _read_parquet(path, list(wanted))
        elif suffix == ".csv":
            raw = _read_csv(path, list(wanted))
        else:
            raw = _read_jsonl(path, list(wanted))
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"source file {path}: cannot be read ({type(e).__name__}: {e})") from e
    raw = raw.rename({src: dst for src, dst in wanted.items() if src != dst and src in raw.columns})
    return _normalise(raw, path)


def _check_columns(path: Path, have: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in have]
    if missing:
        raise SourceError(f"source file {path}: missing column(s) {missing}; it has {have} "
                          "(set the column names with --key-column/--image-column/--caption-column)")


def _read_parquet(path: Path, wanted: list[str]) -> pl.DataFrame:
    _check_columns(path, pa_parquet.read_schema(path).names, wanted)
    table = pa_parquet.read_table(path, columns=wanted)
    return _from_arrow(table, wanted, image_is_text=False)


def _read_csv(path: Path, wanted: list[str]) -> pl.DataFrame:
    # Read every column as binary: a CSV with bad bytes in one caption must not sink the whole
    # file; the bytes are decoded in _text_column and bad cells become row problems.
    with open(path, "rb") as f:
        header = f.readline().decode("utf-8", errors="replace").lstrip("\ufeff")
    have = next(csv.reader([header]), [])
    _check_columns(path, have, wanted)
    # Captions often hold line breaks inside quoted cells.
    table = pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                            convert_options=pa_csv.ConvertOptions(
        include_columns=wanted,
        column_types={c: pa.binary() for c in wanted},
        strings_can_be_null=False))
    # CSV cannot tell null from empty: an empty caption stays "" (a valid, empty caption), while an
    # empty key or image cell means "missing" (null), as in the other formats.
    df = _from_arrow(table, wanted, image_is_text=True)
    return df.with_columns(pl.when(pl.col(c) != "").then(pl.col(c)).alias(c) for c in wanted[:2])


def _read_jsonl(path: Path, wanted: list[str]) -> pl.DataFrame:
    # JSON per line, in Python: one unparseable line or non-UTF-8 string must become one bad row,
    # not an exception for the whole file (polars' ndjson reader fails the file).
    rows: list[dict] = []
    seen: set[str] = set()
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8", errors="surrogateescape").lstrip("\ufeff"))  # BOM
            except ValueError:
                obj = None
            if not isinstance(obj, dict):  # unparseable, or valid JSON that is not an object
                rows.append({"problem": "bad_json_line"})
                continue
            seen.update(obj)
            rows.append({c: obj.get(c) for c in wanted})
    if rows and seen:
        _check_columns(path, sorted(seen), wanted)
    elif rows:
        _check_columns(path, [], wanted)
    out = {c: [] for c in wanted}
    problems: list[str | None] = []
    for r in rows:
        problem = r.get("problem")
        for c in wanted:
            v = r.get(c)
            if isinstance(v, str):
                try:
                    v.encode("utf-8")  # lone surrogates = bytes that were not UTF-8
                except UnicodeEncodeError:
                    v, problem = None, problem or _bad_utf8_code(c, wanted)
            elif v is not None and not isinstance(v, (int, float)):
                v = json.dumps(v)
            out[c].append(None if v is None else str(v))
        problems.append(problem)
    df = pl.DataFrame({c: pl.Series(c, out[c], dtype=pl.String) for c in wanted})
    return df.with_columns(pl.Series("problem", problems, dtype=pl.String))


def _bad_utf8_code(column: str, wanted: list[str]) -> str:
    key, image, caption = wanted
    return {caption: "caption_not_utf8", key: "key_not_utf8", image: "image_not_utf8"}[column]


def _from_arrow(table: pa.Table, wanted: list[str], *, image_is_text: bool) -> pl.DataFrame:
    """Arrow table -> (key, image, caption, problem); `image_is_text` for CSV, whose cells arrive as binary."""
    key, image, caption = wanted
    cols: dict[str, pl.Series] = {}
    problems = [None] * table.num_rows
    for name, code in ((key, "key_not_utf8"), (caption, "caption_not_utf8")):
        cols[name] = _text_column(table.column(name), code, problems)
    img = _plain(table.column(image))
    if pa.types.is_struct(img.type):  # HF datasets Image feature: {"bytes": binary, "path": str}
        values = [None if v is None else (v.get("bytes") or v.get("path")) for v in img.to_pylist()]
        kinds = {type(v) for v in values if v is not None}
        # bytes for some rows and paths for others cannot share a typed column: keep Python objects
        dtype = pl.Object if len(kinds) > 1 else pl.Binary if bytes in kinds else pl.String
        cols[image] = pl.Series(image, values, dtype=dtype)
    elif (pa.types.is_binary(img.type) or pa.types.is_large_binary(img.type)) and not image_is_text:
        cols[image] = pl.Series(image, img.combine_chunks() if img.num_chunks else img).cast(pl.Binary)
    else:
        cols[image] = _text_column(img, "image_not_utf8", problems)
    df = pl.DataFrame([cols[c].alias(c) for c in wanted])
    return df.with_columns(pl.Series("problem", problems, dtype=pl.String))


def _plain(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dictionary-encoded and view columns as their plain string/binary type."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if getattr(pa.types, "is_string_view", lambda t: False)(col.type):
        col = col.cast(pa.large_string())
    if getattr(pa.types, "is_binary_view", lambda t: False)(col.type):
        col = col.cast(pa.large_binary())
    return col


def _text_column(col: pa.ChunkedArray, code: str, problems: list[str | None]) -> pl.Series:
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


def _normalise(raw: pl.DataFrame, path: Path) -> pl.DataFrame:
    base_dir = str(path.resolve().parent)
    return raw.select(
        pl.col("key").cast(pl.String),
        pl.col("image"),
        pl.col("caption").cast(pl.String),
        pl.lit(base_dir, dtype=pl.String).alias("base_dir"),
        pl.col("problem").cast(pl.String),
    )
