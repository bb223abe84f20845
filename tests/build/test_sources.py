"""maws_data.sources on the real Instagram captions table and on small derived files."""

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from maws_data.sources import SourceConfig, SourceError, read_source

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
INSTAGRAM = SHARED / "instagram"
CAPTIONS = INSTAGRAM / "captions.parquet"

needs_data = pytest.mark.skipif(not CAPTIONS.exists(), reason=f"real data not found at {CAPTIONS}")


@pytest.fixture(scope="module")
def real() -> pl.DataFrame:
    if not CAPTIONS.exists():
        pytest.skip(f"real data not found at {CAPTIONS}")
    return pl.read_parquet(CAPTIONS)


@needs_data
def test_parquet_real(real):
    df = read_source(SourceConfig(str(CAPTIONS)))
    assert df.columns == ["row", "key", "image", "caption", "base_dir", "problem"]
    assert df.schema["row"] == pl.UInt64
    assert df.height == real.height == 2261
    assert df["row"].to_list() == list(range(2261))
    assert df["key"].to_list() == real["key"].to_list()
    assert df["caption"].to_list() == real["caption"].to_list()
    assert set(df["base_dir"]) == {str(INSTAGRAM.resolve())}
    assert df["problem"].null_count() == 2261
    # relative image paths resolve against the source file's folder
    first = df.row(0, named=True)
    assert (Path(first["base_dir"]) / first["image"]).is_file()


@needs_data
def test_csv_jsonl_and_folder_with_renamed_columns(real, tmp_path):
    part = real.head(30).rename({"key": "id", "image": "img", "caption": "text"})
    (tmp_path / "sub").mkdir()
    part.head(10).write_csv(tmp_path / "b.csv")
    part.slice(10, 10).write_ndjson(tmp_path / "sub" / "c.jsonl")
    part.slice(20, 10).write_parquet(tmp_path / "a.parquet")
    (tmp_path / "notes.txt").write_text("ignored: not a source file")
    cfg = SourceConfig(str(tmp_path), key_column="id", image_column="img", caption_column="text")
    df = read_source(cfg)
    # files in sorted relative-path order: a.parquet, b.csv, sub/c.jsonl
    expected_keys = real["key"].slice(20, 10).to_list() + real["key"].head(20).to_list()
    assert df["key"].to_list() == expected_keys
    assert df["row"].to_list() == list(range(30))
    expected_captions = real["caption"].slice(20, 10).to_list() + real["caption"].head(20).to_list()
    assert df["caption"].to_list() == expected_captions  # empty captions stay "" in CSV too
    assert df["base_dir"].to_list() == [str(tmp_path)] * 20 + [str(tmp_path / "sub")] * 10
    assert df["problem"].null_count() == 30
    # single CSV / JSONL files read the same way
    assert read_source(SourceConfig(str(tmp_path / "b.csv"), key_column="id", image_column="img",
                                    caption_column="text"))["key"].to_list() == real["key"].head(10).to_list()


@needs_data
def test_missing_column_names_column_and_file(real, tmp_path):
    path = tmp_path / "captions.parquet"
    real.head(5).drop("caption").write_parquet(path)
    with pytest.raises(SourceError) as e:
        read_source(SourceConfig(str(path)))
    assert "caption" in str(e.value) and str(path) in str(e.value)
    assert isinstance(e.value, ValueError)
    csv = tmp_path / "x.csv"
    real.head(5).write_csv(csv)
    with pytest.raises(SourceError, match=r"x\.csv.*'url'"):
        read_source(SourceConfig(str(csv), image_column="url"))


def test_unreadable_and_absent_sources(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet at all")
    with pytest.raises(SourceError, match="broken.parquet.*cannot be read"):
        read_source(SourceConfig(str(bad)))
    with pytest.raises(SourceError, match="no such file"):
        read_source(SourceConfig(str(tmp_path / "nope.parquet")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="contains no"):
        read_source(SourceConfig(str(tmp_path / "empty")))


def test_non_utf8_captions_are_row_problems(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_bytes(b"key,image,caption\na,a.jpg,#cat ok\nb,b.jpg,\"bad \xff\xfe #dog\"\nc,,\n"
                    b'd,d.jpg,"two\nlines, #sea"\n')
    df = read_source(SourceConfig(str(csv)))
    assert df["caption"].to_list() == ["#cat ok", None, "", "two\nlines, #sea"]
    assert df["problem"].to_list() == [None, "caption_not_utf8", None, None]
    assert df["image"].to_list() == ["a.jpg", "b.jpg", None, "d.jpg"]

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"key": "a", "image": "a.jpg", "caption": "fine"}\n'
                      b'{"key": "b", "image": "b.jpg", "caption": "bad \xff"}\n'
                      b'not json\n'
                      b'{"key": 7, "image": "c.jpg", "caption": null}\n')
    df = read_source(SourceConfig(str(jsonl)))
    assert df["key"].to_list() == ["a", "b", None, "7"]
    assert df["problem"].to_list() == [None, "caption_not_utf8", "bad_json_line", None]
    assert df["caption"].to_list() == ["fine", None, None, None]  # a null caption is not a problem

    # a parquet file whose caption column is binary (not declared UTF-8)
    pq.write_table(pa.table({"key": ["a", "b"], "image": ["a.jpg", "b.jpg"],
                             "caption": pa.array([b"#sun", b"\xc3\x28"], type=pa.binary())}),
                   tmp_path / "bin.parquet")
    df = read_source(SourceConfig(str(tmp_path / "bin.parquet")))
    assert df["caption"].to_list() == ["#sun", None]
    assert df["problem"].to_list() == [None, "caption_not_utf8"]


@needs_data
def test_raw_bytes_image_column(real, tmp_path):
    rows = real.head(3)
    blobs = [(INSTAGRAM / p).read_bytes() for p in rows["image"]]
    path = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"key": rows["key"].to_list(), "image": pa.array(blobs, type=pa.binary()),
                             "caption": rows["caption"].to_list()}), path)
    df = read_source(SourceConfig(str(path)))
    assert df.schema["image"] == pl.Binary
    assert df["image"].to_list() == blobs
    # HF datasets' Image feature layout: struct {bytes, path}
    struct = pa.array([{"bytes": blobs[0], "path": None}, {"bytes": None, "path": "images/x.jpg"}],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"key": ["k0", "k1"], "image": struct, "caption": ["a", "b"]}), tmp_path / "hf.parquet")
    assert read_source(SourceConfig(str(tmp_path / "hf.parquet")))["image"].to_list() == [blobs[0], "images/x.jpg"]


def test_dictionary_and_integer_columns(tmp_path):
    path = tmp_path / "dict.parquet"
    pq.write_table(pa.table({"key": pa.array([10, 11, None], type=pa.int64()),
                             "image": pa.array(["a.jpg", "b.jpg", "a.jpg"]).dictionary_encode(),
                             "caption": pa.array(["#x", None, "#x"]).dictionary_encode()}), path)
    df = read_source(SourceConfig(str(path)))
    assert df["key"].to_list() == ["10", "11", None]
    assert df["image"].to_list() == ["a.jpg", "b.jpg", "a.jpg"]
    assert df["caption"].to_list() == ["#x", None, "#x"]
    assert df.schema["image"] == pl.String


def test_folder_files_disagree_on_image_type(tmp_path):
    pq.write_table(pa.table({"key": ["a"], "image": ["a.jpg"], "caption": ["#x"]}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"key": ["b"], "image": pa.array([b"\xff\xd8"], type=pa.binary()),
                             "caption": ["#y"]}), tmp_path / "2.parquet")
    with pytest.raises(SourceError, match="disagree on the type of image column"):
        read_source(SourceConfig(str(tmp_path)))
    with pytest.raises(SourceError, match="must differ"):
        read_source(SourceConfig(str(tmp_path / "1.parquet"), caption_column="image"))


def test_text_only_parquet_chunks_equal_the_arrow_path(real, tmp_path, monkeypatch):
    """The text pass reads local parquet with polars' own reader when key and caption are strings:
    every slice (inside a row group, across two, the last rows) gives the frame the Arrow path
    gives, nulls and non-ASCII captions included; an integer key falls back to the Arrow path."""
    from maws_data import sources
    from maws_data.sources import list_files, read_rows

    native_reads = []
    real_native = sources._read_text_natively
    monkeypatch.setattr(sources, "_read_text_natively", lambda *a: native_reads.append(a) or real_native(*a))

    df = real.select("key", "image", "caption").head(900)
    df = df.with_columns(pl.when(pl.int_range(pl.len()) % 97 == 5).then(None).otherwise(pl.col("caption")).alias("caption"),
                         pl.when(pl.int_range(pl.len()) == 11).then(None).otherwise(pl.col("key")).alias("key"))
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 12).then(pl.lit("#日本 #café ＃ok")).otherwise(pl.col("caption"))
                         .alias("caption"))
    path = tmp_path / "src.parquet"
    df.write_parquet(path, row_group_size=250)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    cfg = SourceConfig(str(path))
    f = list_files(str(path))[0]
    for first, end in ((0, 900), (10, 200), (240, 260), (600, 900), (899, 900)):
        native = read_rows(f, cfg, first, end, text_only=True)
        arrow = read_rows(f, cfg, first, end).with_columns(pl.lit(None, pl.String).alias("image"))
        assert native.equals(arrow) and native.height == end - first
    assert native["caption"].to_list() == df["caption"][899:].to_list()
    assert read_rows(f, cfg, 0, 900, text_only=True)["key"].null_count() == 1
    assert len(native_reads) == 6

    ints = tmp_path / "ints.parquet"
    pl.DataFrame({"key": list(range(30)), "image": ["x.jpg"] * 30, "caption": ["#a"] * 30}).write_parquet(ints)
    g = list_files(str(ints))[0]
    assert read_rows(g, SourceConfig(str(ints)), 5, 8, text_only=True)["key"].to_list() == ["5", "6", "7"]
    assert len(native_reads) == 6
