"""`maws-data build --dedup near --decontaminate` on real images (issue 12).

Into the 2,261-row Instagram source we inject, at the end, the six variants (dedup_images.VARIANTS)
of three distinct Instagram photos and of three Imagenette val images. Checked:
  - every injected copy is removed with the right reason, and its detail names the kept sample or
    the eval file; crops and flips of training photos are kept (docs/dedup.md says why);
  - over the whole sample, the originals removed are exactly the sample's own repeats: the 10
    byte-identical files and 7 reposts within 2 bits (docs/dedup.md "The false positives, looked at");
  - the shards hold no removed sample, and the counts, skipped.jsonl, sidecars and inspect agree;
  - a rebuild, and a build killed (SIGKILL, or a crash in the dedup stage) and resumed, give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dedup_images import IG_IMAGES, IMAGENETTE_VAL, SHARED_DATA, VARIANTS, distinct_photos, make_variant
from maws_data import sidecar
from maws_data.build import BuildConfig, build

CAPTIONS = SHARED_DATA / "instagram" / "captions.parquet"
MAWS_DATA = Path(sys.executable).parent / "maws-data"
# Training-side near dedup catches re-encodes, rescales and grayscale copies; not crops or flips.
EXPECTED_IG = {"exact": "duplicate_image", "q50": "near_duplicate", "half": "near_duplicate",
               "gray": "near_duplicate", "crop": None, "flip": None}
# The sample's own repeats (docs/dedup.md): whichever file of a group comes later in row order goes.
BYTE_IDENTICAL_REPEATS = 10
REPOSTS_WITHIN_2_BITS = {"0729ed52", "5b5f0e26", "f4db5ca2", "f52a1e70", "f92b8207", "692396f9", "f40d3ada",
                         "7e0f37aa", "c2f61083", "5d2044f6", "8baf89bb"}  # 4 groups: 5 + 2 + 2 + 2 files


def eval_images(n: int) -> list[Path]:
    return sorted(IMAGENETTE_VAL.rglob("*.JPEG"))[:n]


def injected_source(folder: Path, rows: int | None = None, photos: int = 3) -> tuple[Path, dict[str, tuple]]:
    """The Instagram captions (first `rows`, or all) + variant rows; returns (parquet, {key: (reason, names)})
    where names is the original's image file (Instagram) or eval file path (Imagenette)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").symlink_to(IG_IMAGES, target_is_directory=True)
    (folder / "inj").mkdir()
    base = pl.read_parquet(CAPTIONS).select("key", "image", "caption")
    base = base.head(rows) if rows is not None else base
    present = set(base["image"].to_list())
    extra, expected = [], {}
    ig = [p for p in distinct_photos(400) if f"images/{p.name}" in present][:photos]
    for src, kind in [(p, "ig") for p in ig] + [(p, "val") for p in eval_images(photos)]:
        for v in VARIANTS:
            key = f"inj-{kind}-{src.stem}-{v}"
            (folder / "inj" / f"{key}.jpg").write_bytes(make_variant(src.read_bytes(), v))
            extra.append({"key": key, "image": f"inj/{key}.jpg", "caption": "#dog #beach"})
            expected[key] = (EXPECTED_IG[v] if kind == "ig" else "eval_contaminated", src)
    path = folder / "captions.parquet"
    pl.concat([base, pl.DataFrame(extra)]).write_parquet(path)
    return path, expected


def config(source: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(**{"source": str(source), "out": str(out), "image_size": 256, "shard_size": 200,
                          "min_count": 5, "decoder": "pil", "processes": 2, "progress": False, "mapping_cache": "",
                          "dedup": "near", "decontaminate": (str(IMAGENETTE_VAL),), **kw})


def digests(build_dir: Path) -> dict[str, str]:
    return {p.relative_to(build_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(build_dir.rglob("*")) if p.is_file() and p.name != "build.json"}


def tar_keys(build_dir: Path) -> list[str]:
    keys = []
    for tar in sorted((build_dir / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            keys += [m.name.split(".", 1)[0] for m in tf if m.name.endswith(".json")]
    return keys


@pytest.fixture(scope="module")
def whole(real_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dedup-whole")
    source, expected = injected_source(folder / "src")
    out = build(config(source, folder / "out"))
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    return out, expected, {s["key"]: s for s in skipped}


def test_injected_copies_are_caught_with_the_right_reason(whole):
    _, expected, skipped = whole
    images = dict(pl.read_parquet(CAPTIONS).select("image", "key").iter_rows())
    for key, (reason, src) in expected.items():
        got = skipped.get(key)
        if reason is None:
            assert got is None, f"{key} was removed: {got}"
            continue
        assert got is not None and got["reason"] == reason, (key, got)
        if reason == "eval_contaminated":
            assert got["detail"].endswith(str(src)) and "phash within" in got["detail"]
        else:  # names the original Instagram photo's sample (the earlier row, kept)
            assert got["kept_key"] == images[f"images/{src.name}"], got
            if reason == "duplicate_image":
                assert got["detail"] == f"same bytes as {got['kept_key']}"
            else:
                assert got["detail"] in [f"phash within {d} bits of {got['kept_key']}" for d in (0, 1, 2)]


def test_the_whole_sample_loses_only_its_own_repeats(whole):
    out, expected, skipped = whole
    originals = {k: s for k, s in skipped.items() if k not in expected}
    reasons = [s["reason"] for s in originals.values()]
    assert reasons.count("duplicate_image") == BYTE_IDENTICAL_REPEATS
    assert reasons.count("eval_contaminated") == 0  # no Instagram photo is near an Imagenette val image
    images = dict(pl.read_parquet(CAPTIONS).select("key", "image").iter_rows())
    near = {Path(images[k]).name[:8] for k, s in originals.items() if s["reason"] == "near_duplicate"}
    kept_of_near = {Path(images[s["kept_key"]]).name[:8] for s in originals.values() if s["reason"] == "near_duplicate"}
    assert len(near) == 7 and near | kept_of_near == REPOSTS_WITHIN_2_BITS  # one kept per group of reposts
    m = json.loads((out / "manifest.json").read_text())
    counts = m["counts"]["skipped"]
    assert counts["duplicate_image"] == BYTE_IDENTICAL_REPEATS + 3
    assert counts["near_duplicate"] == 7 + 9
    assert counts["eval_contaminated"] == 18
    assert m["counts"]["written"] + sum(counts.values()) == m["counts"]["rows"] == 2261 + 36


def test_shards_hold_exactly_the_kept_samples(whole):
    out, _, skipped = whole
    m = json.loads((out / "manifest.json").read_text())
    keys = tar_keys(out)
    assert len(keys) == m["counts"]["written"] == sum(s["samples"] for s in m["shards"])
    sources = set()
    for tar in sorted((out / "shards").glob("*.tar")):
        side = sidecar.decode((tar.parent / (tar.stem + sidecar.SUFFIX)).read_bytes())
        with tarfile.open(tar) as tf:
            metas = [json.loads(tf.extractfile(mem).read()) for mem in tf if mem.name.endswith(".json")]
        assert [k.decode() for k in side.key] == [meta["key"] for meta in metas]
        assert side.phash.tolist() == [int(meta["phash"], 16) for meta in metas]
        assert [bytes(h).hex() for h in side.sha256] == [meta["sha256"] for meta in metas]
        sources |= {meta["source_key"] for meta in metas}
    assert not sources & set(skipped)  # no removed row is in any tar
    shas = [meta for meta in np.concatenate([sidecar.decode(p.read_bytes()).sha256
                                             for p in (out / "shards").glob(f"*{sidecar.SUFFIX}")])]
    assert len({bytes(s) for s in shas}) == len(shas)  # exact dedup: every source's bytes once


def test_inspect_shows_the_removed_rows(whole):
    from maws_data.cli import app
    from typer.testing import CliRunner

    out, _, _ = whole
    result = CliRunner().invoke(app, ["inspect", str(out), "--samples", "1"])
    assert result.exit_code == 0, result.output
    assert "dedup near (near threshold 2)" in result.output
    assert "duplicate_image 13  near_duplicate 16  eval_contaminated 18" in result.output


@pytest.fixture(scope="module")
def small(real_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dedup-small")
    source, _ = injected_source(folder / "src", rows=300, photos=2)
    return folder, source, build(config(source, folder / "clean", shard_size=40))


def test_rebuild_is_byte_identical(small, tmp_path):
    _, source, clean = small
    again = build(config(source, tmp_path / "again", shard_size=40))
    assert digests(again) == digests(clean)
    one = build(config(source, tmp_path / "one", shard_size=40, processes=1))
    same = {k: v for k, v in digests(clean).items() if k != "manifest.json"}
    assert {k: v for k, v in digests(one).items() if k != "manifest.json"} == same  # any number of processes

    def manifest(d):
        m = json.loads((d / "manifest.json").read_text())
        m["config"].pop("processes")
        return m
    assert manifest(one) == manifest(clean)
    m = json.loads((clean / "manifest.json").read_text())["counts"]["skipped"]
    assert m["eval_contaminated"] == 12 and m["duplicate_image"] >= 2 and m["near_duplicate"] >= 6


def test_crash_in_the_dedup_stage_then_resume(small, tmp_path, monkeypatch):
    from maws_data import deduppass

    _, source, clean = small
    real = deduppass.run_filter

    def crash_after_one(job):  # the first shard is filtered, then the build dies
        real(job)
        raise RuntimeError("injected crash in the dedup filter stage")

    monkeypatch.setattr(deduppass, "run_filter", crash_after_one)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="injected crash"):
        build(config(source, out, shard_size=40, processes=1))  # processes=1: tasks run in this process
    assert (out / "_work" / "dedup" / "decisions.npz").exists() and not (out / "manifest.json").exists()
    monkeypatch.setattr(deduppass, "run_filter", real)
    assert digests(build(config(source, out, shard_size=40))) == digests(clean)  # resumed on 2 processes


def test_sigkill_then_resume_equals_clean_build(small, tmp_path, kill_build_when):
    if not MAWS_DATA.exists():
        pytest.skip(f"console script not installed at {MAWS_DATA}")
    _, source, clean = small
    out = tmp_path / "killed"
    cmd = [str(MAWS_DATA), "build", "--source", str(source), "--out", str(out), "--image-size", "256",
           "--shard-size", "40", "--min-count", "5", "--decoder", "pil", "--processes", "1", "--no-progress",
           "--mapping-cache", "", "--dedup", "near", "--decontaminate", str(IMAGENETTE_VAL)]
    kill_build_when(cmd, (out / "shards" / "shard-000002.json").exists, tmp_path / "build.log", "the third shard")
    assert not (out / "manifest.json").exists()
    assert digests(build(config(source, out, shard_size=40))) == digests(clean)


def test_s3_output_with_dedup_equals_local_build(small, s3_prefix):
    # units copied from S3 to a scratch folder, decisions uploaded, removed samples filtered on a local copy
    from maws_data import storage

    _, source, clean = small
    assert build(config(source, s3_prefix, shard_size=40)) == s3_prefix
    fs, root = storage.filesystem(s3_prefix)
    fs.invalidate_cache()
    got = {f[len(root) + 1:]: hashlib.sha256(fs.cat_file(f)).hexdigest() for f in sorted(fs.find(root))
           if not f.endswith("/build.json")}
    assert got == digests(clean)
