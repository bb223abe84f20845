"""Resume: a build killed with SIGKILL mid-way, then rerun, equals a clean build; finished shards are
kept (not rewritten), broken or missing ones redone, stray temp files removed, other inputs refused."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import polars as pl
import pytest
from maws_data.build import BuildConfig, BuildError, build

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CAPTIONS = SHARED_DATA / "instagram" / "captions.parquet"
MAWS_DATA = Path(sys.executable).parent / "maws-data"


def digests(build_dir: Path) -> dict[str, str]:
    """sha256 of every output file (build.json records the --out path, so it is left out)."""
    return {p.relative_to(build_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(build_dir.rglob("*")) if p.is_file() and p.name != "build.json"}


def url_source(folder: Path, base_url: str, rows: int) -> Path:
    """Real rows whose images are fetched from `base_url` (the test's slow local server)."""
    folder.mkdir(parents=True, exist_ok=True)
    df = pl.read_parquet(CAPTIONS).head(rows).with_columns((pl.lit(base_url + "/") + pl.col("image")).alias("image"))
    path = folder / "captions.parquet"
    df.select("key", "image", "caption").write_parquet(path)
    return path


def config(source: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(**{"source": str(source), "out": str(out), "image_size": 64, "shard_size": 4, "min_count": 2,
                          "decoder": "pil", "processes": 1, "progress": False, **kw})


def test_sigkill_then_resume_equals_clean_build(image_server, tmp_path, kill_build_when):
    if not MAWS_DATA.exists():
        pytest.skip(f"console script not installed at {MAWS_DATA}")
    # every response waits 0.3 s: rows of a shard load in parallel, so each of the 10 shards takes
    # >= 0.3 s and the whole image pass >= 3 s: time to kill the build mid-way
    image_server.delay_s = 0.3
    source = url_source(tmp_path / "src", image_server.url, rows=40)
    clean = build(config(source, tmp_path / "clean"))

    killed = tmp_path / "killed"
    cmd = [str(MAWS_DATA), "build", "--source", str(source), "--out", str(killed), "--image-size", "64",
           "--shard-size", "4", "--min-count", "2", "--decoder", "pil", "--processes", "1", "--no-progress"]
    kill_build_when(cmd, (killed / "shards" / "shard-000000.json").exists, tmp_path / "build.log", "the first shard")

    assert not (killed / "manifest.json").exists()
    done = sorted(p.name for p in (killed / "shards").glob("shard-*.json"))
    assert 1 <= len(done) < 10
    kept = {name: (killed / "shards" / name.replace(".json", ".tar")).stat().st_ino for name in done}

    resumed = build(config(source, killed))
    assert digests(resumed) == digests(clean)  # every shard, index, stats, tsv, skipped.jsonl and the manifest
    assert len([k for k in digests(clean) if k.endswith(".tar")]) == 10
    for name, inode in kept.items():  # finished shards were kept, not rewritten
        assert (killed / "shards" / name.replace(".json", ".tar")).stat().st_ino == inode
    assert not list(killed.rglob("*.tmp"))


def test_resume_redoes_broken_shards_and_removes_temp_files(tiny_source, tiny_build, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_build, out)
    shards = out / "shards"
    (out / "manifest.json").unlink()
    (shards / ".shard-000001.tar.tmp").write_bytes(b"half a shard")
    (out / ".vocabulary.tsv.abc123.tmp").write_bytes(b"half a vocabulary")
    tar2 = shards / "shard-000002.tar"
    data = bytearray(tar2.read_bytes())
    data[2000] ^= 0xFF  # same size, different sha256: must be detected and rewritten
    tar2.write_bytes(bytes(data))
    (shards / "shard-000003.json").unlink()  # tar present, commit marker missing: redone
    inodes = {i: (shards / f"shard-{i:06d}.tar").stat().st_ino for i in range(4)}

    build(BuildConfig(source=str(tiny_source), out=str(out), image_size=64, shard_size=16, min_count=2,
                      decoder="pil", processes=1, progress=False))
    assert digests(out) == digests(tiny_build)
    assert not list(out.rglob("*.tmp"))
    assert (shards / "shard-000000.tar").stat().st_ino == inodes[0]
    assert (shards / "shard-000001.tar").stat().st_ino == inodes[1]
    assert (shards / "shard-000002.tar").stat().st_ino != inodes[2]
    assert (shards / "shard-000003.tar").stat().st_ino != inodes[3]


def test_refuses_a_different_input(tiny_source, tiny_build, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_build, out)
    other = tmp_path / "other" / "captions.parquet"
    other.parent.mkdir()
    (other.parent / "images").symlink_to(tiny_source.parent / "images")
    pl.read_parquet(tiny_source).head(59).write_parquet(other)
    cfg = BuildConfig(source=str(other), out=str(out), image_size=64, shard_size=16, min_count=2, decoder="pil",
                      processes=1, progress=False)
    with pytest.raises(BuildError, match="different input or config"):
        build(cfg)
    assert digests(out) == digests(tiny_build)  # untouched


def test_refuses_a_folder_with_foreign_build_files(tiny_source, tmp_path):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "shard-000000.tar").write_bytes(b"not ours")
    with pytest.raises(BuildError, match="no readable build.json"):
        build(BuildConfig(source=str(tiny_source), out=str(out), min_count=2, decoder="pil", processes=1,
                          progress=False))
    assert (out / "shards" / "shard-000000.tar").read_bytes() == b"not ours"
