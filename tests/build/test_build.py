"""maws_data.build end to end on real Instagram rows: layout, sample contents, vocabulary, exact skip
counts after injected bad rows, byte-identical rebuilds (1 vs 2 processes, local vs Ray)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from maws_data.build import BuildConfig, BuildError, build, safe_key
from maws_data.hashtags import extract_hashtags
from maws_data.vocab import (
    Vocabulary,
    build_vocabulary,
    hashtag_map_from_counts,
    row_synsets,
    tag_frame,
    vocabulary_from_counts,
)
from PIL import Image


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tar_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order, read with tarfile only; also returns member order per key."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tf.extractfile(m).read()
    return samples


def all_samples(build_dir: Path) -> list[tuple[str, dict[str, bytes]]]:
    manifest = json.loads((build_dir / "manifest.json").read_text())
    return [s for shard in manifest["shards"] for s in tar_samples(build_dir / shard["name"])]


def output_digests(build_dir: Path) -> dict[str, str]:
    """sha256 of every file a build wrote (except build.json, which records the runtime config)."""
    return {p.relative_to(build_dir).as_posix(): sha256(p) for p in sorted(build_dir.rglob("*"))
            if p.is_file() and p.name != "build.json"}


# ---------------------------------------------------------------------------------------------
# The tiny real build (tests/conftest.py: 60 rows, image_size 64, shard_size 16, min_count 2)


def test_tiny_build_layout_and_manifest(tiny_build, tiny_source):
    m = json.loads((tiny_build / "manifest.json").read_text())
    assert m["schema"] == 1
    # Known for these 60 real posts: 58 carry a kept synset, 82 synsets have >= 2 images.
    assert m["counts"] == {"rows": 60, "written": 60, "labeled": 58, "unlabeled": 2, "caption_missing": 0,
                           "skipped": {}}
    assert m["classes"] == 82
    assert [s["name"] for s in m["shards"]] == [f"shards/shard-{i:06d}.tar" for i in range(4)]
    assert [s["samples"] for s in m["shards"]] == [16, 16, 16, 12]  # unequal last shard
    assert [s["rows"] for s in m["shards"]] == [[0, 16], [16, 32], [32, 48], [48, 60]]
    assert m["inputs"] == [{"path": str(tiny_source.resolve()), "sha256": sha256(tiny_source),
                            "bytes": tiny_source.stat().st_size}]
    assert m["config"]["image_size"] == 64 and m["config"]["min_count"] == 2 and m["config"]["decoder"] == "pil"
    vocab = Vocabulary.load(tiny_build)
    assert len(vocab) == 82
    # The three most frequent classes: #animals..., #pets/#petstagram..., #dog/#dogsofinstagram...
    assert list(zip(vocab.wnids[:3], vocab.counts[:3])) == [("n00015388", 58), ("n01318894", 29), ("n02084071", 27)]
    labeled = 0
    for i, shard in enumerate(m["shards"]):
        tar = tiny_build / shard["name"]
        assert (shard["sha256"], shard["bytes"]) == (sha256(tar), tar.stat().st_size)
        stats = json.loads((tiny_build / f"shards/shard-{i:06d}.json").read_text())
        assert stats["shard"] == tar.name and stats["samples"] == shard["samples"]
        assert stats["sha256"] == shard["sha256"] and stats["rows"] == shard["rows"] and stats["skipped"] == {}
        assert (tiny_build / f"shards/shard-{i:06d}.idx").is_file()
        labeled += stats["labeled"]
    assert labeled == m["counts"]["labeled"]
    assert (tiny_build / "skipped.jsonl").read_text() == ""
    assert not list(tiny_build.rglob("*.tmp"))


def test_tiny_build_samples_match_source(tiny_build, tiny_source):
    src = pl.read_parquet(tiny_source)
    vocab = Vocabulary.load(tiny_build)
    samples = all_samples(tiny_build)
    assert [k for k, _ in samples] == src["key"].to_list()  # row order, keys already webdataset-safe
    for (key, members), caption, image in zip(samples, src["caption"], src["image"]):
        assert sorted(members) == ["cls", "jpg", "json"]
        meta = json.loads(members["json"])
        assert meta["key"] == meta["source_key"] == key
        assert meta["caption"] == caption
        assert meta["hashtags"] == extract_hashtags(caption)
        assert meta["labels"] == [vocab.index[w] for w in meta["wnids"]]
        assert meta["labeled"] == bool(meta["labels"])
        assert int(members["cls"].decode("ascii")) == (meta["labels"][0] if meta["labels"] else -1)
        im = Image.open(io.BytesIO(members["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB"
        assert im.size == (meta["width"], meta["height"])
        orig = Image.open(tiny_source.parent / image)
        assert min(im.size) == min(64, *orig.size)  # shorter side 64, never upscaled


def test_tiny_vocabulary_counts_and_order(tiny_build):
    vocab = Vocabulary.load(tiny_build)
    samples = [json.loads(m["json"]) for _, m in all_samples(tiny_build)]
    # every row was written, so a class's count is the number of samples carrying its wnid
    per_wnid = Counter(w for s in samples for w in s["wnids"])
    assert dict(per_wnid) == dict(zip(vocab.wnids, vocab.counts))
    assert all(c >= 2 for c in vocab.counts)
    assert list(zip(vocab.counts, vocab.wnids)) == sorted(zip(vocab.counts, vocab.wnids),
                                                         key=lambda cw: (-cw[0], cw[1]))
    # hashtag_map: every distinct tag, its row count, its synsets; vocabulary hashtags come from it
    hm = pl.read_csv(tiny_build / "hashtag_map.tsv", separator="\t", schema_overrides={"wnids": pl.String})
    tag_rows = Counter(t for s in samples for t in s["hashtags"])
    assert dict(zip(hm["hashtag"], hm["count"])) == dict(tag_rows)
    tag_wnids = {t: (w or "").split() for t, w in zip(hm["hashtag"], hm["wnids"])}
    for wnid, tags in zip(vocab.wnids, vocab.hashtags):
        assert set(tags) == {t for t, ws in tag_wnids.items() if wnid in ws}


def test_vocabulary_selection_rule():
    rows = pl.DataFrame({"row": [0, 1, 2, 3, 4], "hashtags": [["a", "b"], ["b", "c"], ["c"], ["b", "d"], ["e"]]},
                        schema={"row": pl.Int64, "hashtags": pl.List(pl.String)})
    tags = tag_frame({"a": ["n1"], "b": ["n2", "n1"], "c": ["n3"], "d": ["n3"], "e": []})
    wn = row_synsets(rows, tags)
    assert wn["wnids"].to_list() == [["n1", "n2"], ["n2", "n1", "n3"], ["n3"], ["n2", "n1", "n3"], []]
    v = build_vocabulary(rows, wn, tags, min_count=2, max_classes=None, synset_name=lambda w: w + ".n.01")
    # n1: rows 0,1,3 = 3; n2: 0,1,3 = 3; n3: 1,2,3 = 3 -> all tie, order by wnid
    assert v.wnids == ("n1", "n2", "n3") and v.counts == (3, 3, 3)
    assert v.hashtags == (("b", "a"), ("b",), ("c", "d"))  # most frequent tag first
    v2 = build_vocabulary(rows, wn, tags, min_count=2, max_classes=2, synset_name=str)
    assert v2.wnids == ("n1", "n2")
    assert build_vocabulary(rows, wn, tags, min_count=4, max_classes=None, synset_name=str).wnids == ()
    # the build's path, from merged counts (columns): the same classes, counts and feeding tags, and
    # a tag that only duplicate rows held (count 0, "z") feeds nothing
    synsets = pl.DataFrame({"wnid": ["n1", "n2", "n3"], "count": [3, 3, 3]})
    counted = pl.DataFrame({"hashtag": ["a", "b", "c", "d", "e", "z"], "count": [1, 3, 2, 1, 1, 0],
                            "wnids": [["n1"], ["n2", "n1"], ["n3"], ["n3"], [], ["n1"]],
                            "rule": ["lemma"] * 4 + ["unmapped", "lemma"]})
    for max_classes, min_count in ((None, 2), (2, 2), (None, 4)):
        want = build_vocabulary(rows, wn, tags, min_count=min_count, max_classes=max_classes, synset_name=str)
        assert vocabulary_from_counts(synsets, counted, min_count=min_count, max_classes=max_classes,
                                      synset_name=str) == want
    assert hashtag_map_from_counts(counted).rows() == [("b", 3, "n2 n1", "lemma"), ("c", 2, "n3", "lemma"),
                                                       ("a", 1, "n1", "lemma"), ("d", 1, "n3", "lemma"),
                                                       ("e", 1, None, "unmapped")]


def test_safe_key():
    assert safe_key("abc-DEF_1") == "abc-DEF_1"
    assert safe_key("a.b/c d\te") == "a_b_c_d_e"
    assert safe_key("ключ") == "____"
    long = safe_key("x" * 200)
    assert len(long) == 64 and long.startswith("x" * 47 + "_")
    assert long != safe_key("x" * 201)


# ---------------------------------------------------------------------------------------------
# Injected bad rows (tests/build/conftest.py:make_bad_source)


def bad_config(source: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(**{"source": str(source), "out": str(out), "image_size": 64, "shard_size": 4, "min_count": 1,
                          "dedup": "none",  # rows 24, 26, 27 reuse images of rows 2, 4, 5 to test text checks
                          "decoder": "pil", "processes": 1, "progress": False, "mapping_cache": "", **kw})


@pytest.fixture(scope="module")
def bad_build(bad_source, tmp_path_factory) -> Path:
    return build(bad_config(bad_source, tmp_path_factory.mktemp("bad") / "out"))


def check_bad_build(out: Path) -> None:
    """The exact outcome of tests/build/conftest.py:make_bad_source at shard_size 4."""
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["rows"] == 30
    assert m["counts"]["written"] == 23  # rows 0-19, 24 (null caption: kept, unlabeled), 26, 27
    assert m["counts"]["caption_missing"] == 1
    assert m["counts"]["skipped"] == {"caption_not_utf8": 1, "duplicate_key": 1, "empty": 1, "missing_path": 1,
                                      "not_image": 1, "null_key": 1, "truncated": 1}
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["row"], s["reason"]) for s in skipped] == [
        (20, "missing_path"), (21, "truncated"), (22, "not_image"), (23, "duplicate_key"),
        (25, "null_key"), (28, "empty"), (29, "caption_not_utf8")]
    assert [s["key"] for s in skipped] == ["missing-1", "trunc-1", "text-1", all_samples(out)[0][0],
                                           None, "empty-1", "badutf8-1"]
    assert skipped[3]["detail"] == f"key {all_samples(out)[0][0]!r} already used by row 0"
    assert all(s["detail"] for s in skipped)
    # shards 5 (rows 20-23) and 7 (rows 28-29) have no sample: committed by their stats, no tar, not in the manifest
    assert [s["name"] for s in m["shards"]] == [f"shards/shard-{i:06d}.tar" for i in (0, 1, 2, 3, 4, 6)]
    assert [s["samples"] for s in m["shards"]] == [4, 4, 4, 4, 4, 3]
    empty = json.loads((out / "shards/shard-000005.json").read_text())
    assert (empty["shard"], empty["samples"], empty["rows"]) == (None, 0, [20, 24])
    assert empty["skipped"] == {"missing_path": 1, "truncated": 1, "not_image": 1, "duplicate_key": 1}
    assert not (out / "shards/shard-000005.tar").exists()
    last = tar_samples(out / "shards/shard-000006.tar")
    assert [k for k, _ in last] == ["nullcap-1", "we_ird_key_name", "we_ird_key_name_r27"]
    metas = [json.loads(m["json"]) for _, m in last]
    assert [m["source_key"] for m in metas] == ["nullcap-1", "we.ird/key name", "we_ird_key_name"]
    assert (metas[0]["caption"], metas[0]["hashtags"], metas[0]["labels"]) == (None, [], [])
    assert last[0][1]["cls"] == b"-1"
    assert json.loads((out / "shards/shard-000006.json").read_text())["caption_missing"] == 1


def test_bad_rows_are_counted_exactly(bad_build):
    check_bad_build(bad_build)


def split_bad_source(bad_source: Path, src: Path) -> Path:
    """The same 30 rows as three files (split at shard boundaries), beside the same images."""
    table = pl.read_parquet(bad_source)
    src.mkdir()
    (src / "images").symlink_to(bad_source.parent / "images", target_is_directory=True)
    (src / "bad").symlink_to(bad_source.parent / "bad", target_is_directory=True)
    for i, (a, b) in enumerate([(0, 12), (12, 24), (24, 30)]):
        table.slice(a, b - a).write_parquet(src / f"part-{i}.parquet")
    return src


def test_bad_rows_over_several_files_and_key_buckets(bad_source, bad_build, tmp_path, monkeypatch):
    # keys spread over 7 hash buckets: the duplicate (row 23 = row 0, another file) and the
    # sanitised-key clash (26/27) are still found
    from maws_data import textpass

    monkeypatch.setattr(textpass, "KEYS_PER_BUCKET", 4)
    src = split_bad_source(bad_source, tmp_path / "split")
    out = build(bad_config(src, tmp_path / "out"))
    check_bad_build(out)
    first, second = output_digests(bad_build), output_digests(out)
    assert sorted(first) == sorted(second)
    # skipped.jsonl names the missing file's path, which is another folder here
    assert {k: v for k, v in first.items() if not k.endswith((".json", ".jsonl"))} == \
        {k: v for k, v in second.items() if not k.endswith((".json", ".jsonl"))}
    for name in (k for k in first if k.startswith("shards/") and k.endswith(".json")):
        a, b = (json.loads((d / name).read_text()) for d in (bad_build, out))
        assert a.pop("fingerprint") != b.pop("fingerprint")  # other inputs, same shard
        for r in a["skipped_rows"] + b["skipped_rows"]:
            r["detail"] = r["detail"].replace(str(src), str(bad_source.parent))
        assert a == b


def test_merged_key_spills_decide_as_the_unit_spills(bad_source, tmp_path, monkeypatch):
    # 8 text units (one shard each) and 7 key buckets; forced past MERGE_MIN_READS, a merge round
    # joins pairs of units' spills (4 groups: rows 0 and 23, the duplicate pair, in different ones)
    # and the keys round reads the groups: every output byte equals the unmerged build's
    from maws_data import textpass

    monkeypatch.setattr(textpass, "KEYS_PER_BUCKET", 4)
    src = split_bad_source(bad_source, tmp_path / "split")
    plain = build(bad_config(src, tmp_path / "plain", text_unit_rows=4))
    merged_groups = []
    real_merge = textpass.merge_spills

    def spy(task):
        res = real_merge(task)
        merged_groups.append((task.first_unit, task.end_unit, Path(textpass._group_url(task.work, task.group)).is_file()))
        for u in range(task.first_unit, task.end_unit):  # so that a keys round reading these instead fails
            Path(textpass._unit_url(task.work, u)).unlink()
        return res

    monkeypatch.setattr(textpass, "MERGE_MIN_READS", 0)
    monkeypatch.setattr(textpass, "GROUP_ROWS", 8)
    monkeypatch.setattr(textpass, "merge_spills", spy)  # processes=1: tasks run inline, so the spy sees them
    merged = build(bad_config(src, tmp_path / "merged", text_unit_rows=4))
    assert sorted(merged_groups) == [(0, 2, True), (2, 4, True), (4, 6, True), (6, 8, True)]
    check_bad_build(merged)
    assert output_digests(merged) == output_digests(plain)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_merged_spill_holds_each_units_rows_in_order(tmp_path, where, request):
    # the byte-level merge: bucket b of the group = bucket b of each unit, in unit order; on S3 the
    # keys round's reads are exact range requests
    from maws_data import textpass
    from maws_data.manifest import write_bytes

    work, buckets = (str(tmp_path) if where == "local" else request.getfixturevalue("s3_prefix")), 3
    units = [pl.DataFrame({"row": pl.Series([r, r + 1, r + 2], dtype=pl.UInt64), "key": [f"k{r}", f"k{r + 1}", f"k{r + 2}"]})
             for r in (0, 10)]
    for u, df in enumerate(units):
        df = df.with_columns(pl.col("key").alias("safe"), pl.Series("bucket", [0, 2, 0], dtype=pl.UInt32))
        write_bytes(textpass._unit_url(work, u), textpass._spill_bytes(df, buckets))
    textpass.merge_spills(textpass.MergeTask(0, work, buckets, 0, 2))
    group = textpass._group_url(work, 0)
    read = [textpass._read_spill(group, b) for b in range(buckets)]
    assert read[0].column("row").to_pylist() == [0, 2, 10, 12]
    assert read[1] is None
    assert read[2].column("key").to_pylist() == ["k1", "k11"]
    # what a keys task reads: a bucket from many spills at once (on S3 by concurrent range requests)
    urls = [textpass._unit_url(work, 0), textpass._unit_url(work, 1), group]
    assert [t.column("row").to_pylist() for t in textpass._read_bucket(urls, 0)] == [[0, 2], [10, 12], [0, 2, 10, 12]]
    assert textpass._read_bucket(urls, 1) == [] and textpass._read_bucket([], 0) == []
    assert [t.column("key").to_pylist() for t in textpass._read_bucket(urls[1:], 2)] == [["k11"], ["k1", "k11"]]


def test_two_builds_are_byte_identical(bad_source, bad_build, tmp_path):
    # a second build, 2 worker processes of 1 thread instead of 1 of 16: every output file has the same bytes
    again = build(bad_config(bad_source, tmp_path / "again", processes=2, threads=1))
    first, second = output_digests(bad_build), output_digests(again)
    assert sorted(first) == sorted(second)
    assert len([f for f in first if f.endswith(".tar")]) == 6
    assert first == second | {"manifest.json": first["manifest.json"]}
    # the manifests differ only in the runtime settings
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (bad_build, again))
    assert (m1["config"].pop("processes"), m2["config"].pop("processes")) == (1, 2)
    assert (m1["config"].pop("threads"), m2["config"].pop("threads")) == (16, 1)
    assert m1 == m2


def test_refuses_other_config_unless_overwrite(bad_source, tmp_path):
    out = tmp_path / "out"
    build(bad_config(bad_source, out, shard_size=15))
    with pytest.raises(BuildError, match="different input or config"):
        build(bad_config(bad_source, out, shard_size=10))
    build(bad_config(bad_source, out, shard_size=10, overwrite=True))
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["shard_size"] == 10 and len(m["shards"]) == 3
    assert sorted(p.name for p in (out / "shards").glob("*.json")) == [f"shard-{i:06d}.json" for i in range(3)]


def test_ray_runner_matches_local(tiny_source, tiny_build, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = build(BuildConfig(source=str(tiny_source), out=str(tmp_path / "ray"), image_size=64, shard_size=16,
                                min_count=2, decoder="pil", runner="ray", progress=False))
    finally:
        ray.shutdown()
    local, remote = output_digests(tiny_build), output_digests(out)
    tars = {k: v for k, v in local.items() if k.endswith(".tar")}
    assert len(tars) == 4
    assert {k: remote[k] for k in tars} == tars
    assert {k: v for k, v in remote.items() if k != "manifest.json"} == \
        {k: v for k, v in local.items() if k != "manifest.json"}


def test_known_tags_get_imagenet_style_wnids(tiny_build):
    vocab = Vocabulary.load(tiny_build)
    by_wnid = dict(zip(vocab.wnids, vocab.names))
    assert by_wnid["n02084071"] == "dog.n.01" and by_wnid["n02121620"] == "cat.n.01"
    assert {"dog", "dogs"} <= set(vocab.hashtags[vocab.index["n02084071"]])
    hm = pl.read_csv(tiny_build / "hashtag_map.tsv", separator="\t", schema_overrides={"wnids": pl.String})
    rows = {t: (w, r) for t, w, r in zip(hm["hashtag"], hm["wnids"], hm["rule"])}
    assert rows["dog"] == ("n02084071", "lemma") and rows["cats"] == ("n02121620", "morphy")
    assert rows["instagood"] == (None, "stopword")  # listed, unmapped, with the reason
    for _, members in all_samples(tiny_build):
        meta = json.loads(members["json"])
        if "dog" in meta["hashtags"]:
            assert vocab.index["n02084071"] in meta["labels"]


def test_dali_decoder_on_cpu_gives_the_same_samples(tiny_source, tiny_build, tmp_path):
    pytest.importorskip("nvidia.dali")
    out = build(BuildConfig(source=str(tiny_source), out=str(tmp_path / "dali"), image_size=64, shard_size=16,
                            min_count=2, decoder="dali", processes=1, progress=False))
    pil, dali = all_samples(tiny_build), all_samples(out)
    assert [k for k, _ in dali] == [k for k, _ in pil]
    distances = []
    for (_, a), (_, b) in zip(pil, dali):
        ma, mb = json.loads(a["json"]), json.loads(b["json"])
        # same labels, size and source sha256; the phash is of each decoder's own pixels
        distances.append((int(ma.pop("phash"), 16) ^ int(mb.pop("phash"), 16)).bit_count())
        assert ma == mb and a["cls"] == b["cls"]
        assert Image.open(io.BytesIO(b["jpg"])).size == Image.open(io.BytesIO(a["jpg"])).size
    assert json.loads((out / "manifest.json").read_text())["config"]["decoder"] == "dali"
    assert max(distances) <= 8 and sorted(distances)[len(distances) // 2] <= 2, distances  # near, not equal


@pytest.mark.gpu
def test_dali_decoder_on_gpu_gives_the_same_samples(tiny_source, tiny_build, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = build(BuildConfig(source=str(tiny_source), out=str(tmp_path / "gpu"), image_size=64, shard_size=16,
                            min_count=2, decoder="auto", processes=1, progress=False))
    assert json.loads((out / "manifest.json").read_text())["config"]["decoder"] == "dali"
    pil, dali = all_samples(tiny_build), all_samples(out)
    assert [(k, m["json"], m["cls"]) for k, m in dali] == [(k, m["json"], m["cls"]) for k, m in pil]


def test_tar_writer_writes_the_bytes_tarfile_writes(tmp_path):
    # shards.TarWriter builds USTAR headers from a template; they must be tarfile's, byte for byte,
    # and its index dali_index's (which re-parses the tar); names over USTAR's 100 bytes fail as in tarfile
    from maws_data.shards import TarWriter, add_sample, dali_index

    samples = [("a", {"jpg": b"\xff" * 513, "cls": b"3", "json": b"{}"}),
               ("k" * 95, {"jpg": b"x" * 512, "cls": b"-1", "json": b'{"a":1}'}),
               ("caf\u00e9_" + "9" * 40, {"jpg": b"", "cls": b"0", "json": b"[]"})]
    for n in (0, 1, 3):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples[:n]:
                add_sample(tar, key, members)
        path = tmp_path / f"ours-{n}.tar"
        with open(path, "wb") as f:
            writer = TarWriter(f)
            for key, members in samples[:n]:
                writer.add(key, members)
            digest, size, index = writer.close()
        assert path.read_bytes() == buf.getvalue()
        assert (digest, size) == (hashlib.sha256(buf.getvalue()).hexdigest(), len(buf.getvalue()))
        assert index == dali_index(path)
    with pytest.raises(ValueError, match="name is too long"):
        TarWriter(io.BytesIO()).add("k" * 120, {"jpg": b""})


def test_tar_writer_starts_writeback_without_changing_bytes(tmp_path, monkeypatch):
    # every few MB the writer flushes and hands the range to the kernel's writeback
    # (sync_file_range): the file must be the same bytes, and each range asked for exactly once
    from maws_data import shards

    calls = []
    real = shards.start_writeback
    monkeypatch.setattr(shards, "WRITEBACK_BYTES", 3000)
    monkeypatch.setattr(shards, "start_writeback", lambda fd, off, n: (calls.append((off, n)), real(fd, off, n)))
    samples = [(f"s{i}", {"jpg": bytes([i]) * (700 + 97 * i), "cls": b"1", "json": b"{}"}) for i in range(20)]
    with open(tmp_path / "a.tar", "wb") as f:
        writer = shards.TarWriter(f)
        for key, members in samples:
            writer.add(key, members)
        digest, size, _ = writer.close()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            shards.add_sample(tar, key, members)
    assert (tmp_path / "a.tar").read_bytes() == buf.getvalue()
    assert (digest, size) == (hashlib.sha256(buf.getvalue()).hexdigest(), len(buf.getvalue()))
    assert len(calls) >= 5 and calls[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(calls)) and all(n >= 3000 for _, n in calls)


def test_commit_markers_are_fsynced_and_text_pass_scratch_is_not(tiny_source, tiny_build, tmp_path, monkeypatch):
    # a crash before the manifest means a rerun, which redoes the text pass: its spills and tables
    # need no fsync (each one held the scan's processes off the CPU), but every shard's tar and its
    # stats JSON (the commit marker) and the manifest must reach the disk
    import os

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = build(BuildConfig(source=str(tiny_source), out=str(tmp_path / "b"), image_size=64, shard_size=16,
                            min_count=2, decoder="pil", processes=1, progress=False))
    assert output_digests(out) == output_digests(tiny_build)
    names = [Path(p).name for p in synced]  # temporary names: .NAME.<random>.tmp, or .NAME.tmp
    assert not [p for p in synced if "/_work/" in p and ("/keys/" in p or p.endswith((".parquet.tmp", ".arrows.tmp")))]
    assert not [n for n in names if n.startswith((".labels.parquet", ".tags.parquet", ".known.parquet"))]
    assert sorted(n.split(".")[1] for n in names if re.fullmatch(r"\.shard-\d{6}\.json\.\w+\.tmp", n)) == [
        f"shard-{i:06d}" for i in range(4)]  # every shard's commit marker
    assert sum(bool(re.fullmatch(r"\.shard-\d{6}\.tar\.tmp", n)) for n in names) == 4
    assert sum(bool(re.fullmatch(r"\.shard-\d{6}\.npz\.\w+\.tmp", n)) for n in names) == 4  # dedup units, before the markers
    assert any(n.startswith(".manifest.json") for n in names)


def test_plan_batches_local_files_and_keeps_remote_ones_alone():
    from maws_data.plan import BATCH_MAX_FILES, ScanTask, scan_batches
    from maws_data.sources import SourceConfig, SourceFile

    src = SourceConfig("unused")
    def tasks(urls):
        return [ScanTask(SourceFile(u, "parquet", "/"), src, 1000) for u in urls]

    local = [f"/data/part-{i:05d}.parquet" for i in range(400)]
    sizes = [len(b.tasks) for b in scan_batches(tasks(local), workers=2)]  # 400 // 16 = 25 a batch
    assert sizes == [25] * 16
    assert [len(b.tasks) for b in scan_batches(tasks(local[:10]), workers=2)] == [1] * 10  # < 8 a worker: alone
    big = [len(b.tasks) for b in scan_batches(tasks(local * 10), workers=1)]
    assert set(big) == {BATCH_MAX_FILES} and sum(big) == 4000
    mixed = tasks(local[:40] + ["s3://b/x.parquet", "https://h/y.parquet"] + local[40:80])
    batches = scan_batches(mixed, workers=1)  # 82 // 8 = 10 a batch
    assert [[t.file.url for t in b.tasks] for b in batches] == (
        [local[i:i + 10] for i in range(0, 40, 10)] + [["s3://b/x.parquet"], ["https://h/y.parquet"]]
        + [local[i:i + 10] for i in range(40, 80, 10)])
