"""The build on object storage and from every kind of source, against a real SeaweedFS S3 server
(tests/conftest.py: s3_server, s3_prefix): S3 output equal to a local build, an S3 source, resume after
SIGKILL on S3, chunked CSV/JSONL reads, Hugging Face save_to_disk folders, globs."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import polars as pl
import pytest
from maws_data import storage
from maws_data.build import BuildConfig, build
from maws_data.sources import SourceConfig, list_files, read_rows, read_source, scan_file

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
INSTAGRAM = SHARED_DATA / "instagram"
CAPTIONS = INSTAGRAM / "captions.parquet"
MAWS_DATA = Path(sys.executable).parent / "maws-data"
TINY = {"image_size": 64, "shard_size": 16, "min_count": 2, "decoder": "pil", "processes": 1, "progress": False}


def local_digests(build_dir: Path) -> dict[str, str]:
    return {p.relative_to(build_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(build_dir.rglob("*")) if p.is_file() and p.name != "build.json"}


def remote_digests(url: str) -> dict[str, str]:
    fs, root = storage.filesystem(url)
    fs.invalidate_cache()
    return {f[len(root) + 1:]: hashlib.sha256(fs.cat_file(f)).hexdigest() for f in sorted(fs.find(root))
            if not f.endswith("/build.json")}


def test_s3_output_equals_local_build(tiny_source, tiny_build, s3_prefix):
    out = build(BuildConfig(source=str(tiny_source), out=s3_prefix, **TINY))
    assert out == s3_prefix
    got = remote_digests(s3_prefix)
    assert got == local_digests(tiny_build)  # every shard, index, sidecar, stats, tsv, skipped.jsonl, manifest
    # a rerun on a finished S3 build keeps every shard and rewrites the same bytes
    build(BuildConfig(source=str(tiny_source), out=s3_prefix, **TINY))
    assert remote_digests(s3_prefix) == got
    # `maws-data inspect` reads it where it is, and says what it says of the local copy
    from maws_data.cli import app
    from typer.testing import CliRunner

    remote, local = (CliRunner().invoke(app, ["inspect", d, "--samples", "2"]) for d in (s3_prefix, str(tiny_build)))
    assert remote.exit_code == 0 and local.exit_code == 0, remote.output
    def body(out: str) -> str:  # from the counts on: the first line(s) name the build and its inputs
        return out[out.index("rows "):]
    assert body(remote.output) == body(local.output)
    assert "first 2 samples of shard-000000.tar" in remote.output


def test_s3_source_with_relative_images(tiny_source, tiny_build, s3_prefix):
    fs, root = storage.filesystem(s3_prefix)
    df = pl.read_parquet(tiny_source)
    fs.put_file(str(tiny_source), f"{root}/src/part-0.parquet")
    for rel in df["image"]:
        fs.put_file(str(INSTAGRAM / rel), f"{root}/src/{rel}")
    out = build(BuildConfig(source=f"{s3_prefix}/src", out=f"{s3_prefix}/out", **TINY))
    got, want = remote_digests(out), local_digests(tiny_build)
    assert sorted(got) == sorted(want)
    # the input is identified by ETag instead of sha256, so only the fingerprints differ
    same = [k for k in want if k.endswith((".tar", ".idx", ".npz", ".tsv", ".jsonl"))]
    assert len([k for k in same if k.endswith(".tar")]) == 4
    assert {k: got[k] for k in same} == {k: want[k] for k in same}
    manifest = json.loads(fs.cat_file(f"{root}/out/manifest.json"))
    assert manifest["inputs"][0]["path"] == f"{s3_prefix}/src/part-0.parquet" and manifest["inputs"][0]["etag"]


def test_http_source_file(tiny_source, tiny_build, tmp_path, folder_server):
    with folder_server(tiny_source.parent) as server:  # no range requests: the file is fetched once
        out = build(BuildConfig(source=f"{server.url}/captions.parquet", out=str(tmp_path / "out"), **TINY))
    got, want = local_digests(out), local_digests(tiny_build)
    same = [k for k in want if k.endswith((".tar", ".idx", ".npz", ".tsv", ".jsonl"))]
    assert {k: got[k] for k in same} == {k: want[k] for k in same}  # images fetched next to the file's URL


def test_s3_resume_after_sigkill_equals_clean_build(image_server, s3_prefix, tmp_path, kill_build_when):
    if not MAWS_DATA.exists():
        pytest.skip(f"console script not installed at {MAWS_DATA}")
    image_server.delay_s = 0.3  # each 4-row shard takes >= 0.3 s: time to kill mid-way
    src = tmp_path / "src" / "captions.parquet"
    src.parent.mkdir()
    pl.read_parquet(CAPTIONS).head(40).with_columns((pl.lit(image_server.url + "/") + pl.col("image")).alias("image")) \
        .select("key", "image", "caption").write_parquet(src)
    args = {"image_size": 64, "shard_size": 4, "min_count": 2, "decoder": "pil", "processes": 1, "progress": False}
    clean = build(BuildConfig(source=str(src), out=str(tmp_path / "clean"), **args))

    out = f"{s3_prefix}/killed"
    fs, root = storage.filesystem(out)
    cmd = [str(MAWS_DATA), "build", "--source", str(src), "--out", out, "--image-size", "64", "--shard-size", "4",
           "--min-count", "2", "--decoder", "pil", "--processes", "1", "--no-progress"]
    def second_shard_done() -> bool:
        fs.invalidate_cache()
        return fs.exists(f"{root}/shards/shard-000001.json")

    kill_build_when(cmd, second_shard_done, tmp_path / "build.log", "a finished shard")
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/manifest.json")
    done = sorted(f for f in fs.ls(f"{root}/shards") if f.endswith(".json"))
    assert 2 <= len(done) < 10
    kept = {f: fs.info(f.replace(".json", ".tar"))["ETag"] for f in done}

    resumed = build(BuildConfig(source=str(src), out=out, **args))
    assert remote_digests(resumed) == local_digests(clean)
    for f, etag in kept.items():  # finished shards were kept, not uploaded again
        assert fs.info(f.replace(".json", ".tar"))["ETag"] == etag
    assert not fs.exists(f"{root}/_work")


# ---------------------------------------------------------------------------------------------
# Sources in chunks


@pytest.fixture(scope="module")
def real() -> pl.DataFrame:
    if not CAPTIONS.exists():
        pytest.skip(f"real data not found at {CAPTIONS}")
    return pl.read_parquet(CAPTIONS).head(300)


def _chunks(f, cfg: SourceConfig, step: int) -> pl.DataFrame:
    layout = scan_file(f, cfg, step)
    parts = []
    for j, first in enumerate(range(0, layout.rows, step)):
        rng = (layout.offsets[j], layout.offsets[j + 1]) if layout.offsets else None
        parts.append(read_rows(f, cfg, first, min(first + step, layout.rows), byte_range=rng))
    return pl.concat(parts)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_reading_in_chunks_equals_reading_whole(real, tmp_path, fmt):
    # captions with line breaks inside quoted CSV cells, a blank JSONL line, parquet row groups of 64
    df = real.with_columns(pl.when(pl.int_range(pl.len()) % 7 == 0).then(pl.col("caption") + "\nsecond, line")
                           .otherwise(pl.col("caption")).alias("caption"))
    path = tmp_path / f"x.{fmt}"
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(df.to_arrow(), path, row_group_size=64)
    elif fmt == "csv":
        df.write_csv(path)
    else:
        path.write_text(df.head(100).write_ndjson() + "\n" + df.slice(100).write_ndjson())
    cfg = SourceConfig(str(path))
    whole = read_source(cfg).drop("row", "base_dir")
    (f,) = list_files(str(path))
    for step in (1, 17, 100, 1000):
        assert _chunks(f, cfg, step).equals(whole), step
    assert whole["caption"].to_list() == df["caption"].to_list()


def test_hf_save_to_disk_and_globs(real, tmp_path, tiny_build):
    datasets = pytest.importorskip("datasets")
    head = real.head(60)
    ds = datasets.Dataset.from_dict({"key": head["key"].to_list(), "image": head["image"].to_list(),
                                     "caption": head["caption"].to_list()})
    folder = tmp_path / "hf"
    ds.save_to_disk(str(folder), max_shard_size="4KB")  # several arrow files
    (folder / "images").symlink_to(INSTAGRAM / "images", target_is_directory=True)
    files = list_files(str(folder))
    assert len(files) > 1 and {f.fmt for f in files} == {"arrow"}
    df = read_source(SourceConfig(str(folder)))
    assert df["key"].to_list() == head["key"].to_list()
    # the same rows as three parquet files, given as a glob
    for i, (a, b) in enumerate([(0, 16), (16, 32), (32, 60)]):
        head.slice(a, b - a).write_parquet(tmp_path / f"part-{i}.parquet")
    (tmp_path / "images").symlink_to(INSTAGRAM / "images", target_is_directory=True)
    out = build(BuildConfig(source=str(tmp_path / "part-*.parquet"), out=str(tmp_path / "out"), **TINY))
    got, want = local_digests(out), local_digests(tiny_build)
    same = [k for k in want if k.endswith((".tar", ".idx", ".npz", ".tsv", ".jsonl"))]
    assert {k: got[k] for k in same} == {k: want[k] for k in same}  # split at shard boundaries: same shards
