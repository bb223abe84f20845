"""The shards are plain WebDataset: read `tiny_build` with webdataset, wids, HF `datasets` and DALI's
webdataset reader (CPU, with our .idx files), without any project code in the reading part, and check
that the labels agree with vocabulary.tsv (read with the csv module)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest


def vocabulary(build_dir: Path) -> list[tuple[str, int]]:
    """(wnid, count) per class index, from vocabulary.tsv."""
    with open(build_dir / "vocabulary.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    return [(r["wnid"], int(r["count"])) for r in rows]


def shards(build_dir: Path) -> list[dict]:
    return json.loads((build_dir / "manifest.json").read_text())["shards"]


def check_labels(build_dir: Path, samples: list[tuple[int, dict]]) -> None:
    """`samples` = (cls, json) of every sample, in order: cls and json labels agree with the vocabulary,
    and (every row of the tiny build was written) the per-class sample counts are the vocabulary's."""
    vocab = vocabulary(build_dir)
    assert len(samples) == 60
    for cls, meta in samples:
        assert cls == (meta["labels"][0] if meta["labels"] else -1)
        assert [vocab[i][0] for i in meta["labels"]] == meta["wnids"]
        assert meta["labeled"] == bool(meta["labels"])
    per_class = Counter(i for _, meta in samples for i in meta["labels"])
    assert [per_class[i] for i in range(len(vocab))] == [count for _, count in vocab]
    with open(Path(build_dir) / "manifest.json") as f:
        assert sum(1 for _, meta in samples if meta["labeled"]) == json.load(f)["counts"]["labeled"]


def test_plain_webdataset(tiny_build):
    import webdataset as wds

    urls = [str(tiny_build / s["name"]) for s in shards(tiny_build)]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "cls", "json")
    rows = list(ds)
    for key, img, cls, meta in rows:
        assert key == meta["key"]
        assert img.mode == "RGB" and img.size == (meta["width"], meta["height"]) and min(img.size) <= 64
        assert isinstance(cls, int)
    check_labels(tiny_build, [(cls, meta) for _, _, cls, meta in rows])


def test_wids(tiny_build):
    wids = pytest.importorskip("wids", reason="wids is not installed")
    spec = [{"url": str(tiny_build / s["name"]), "nsamples": s["samples"]} for s in shards(tiny_build)]
    ds = wids.ShardListDataset(spec, transformations=[])  # raw members: no decoding by wids

    def raw(v) -> bytes:
        return v.read() if hasattr(v, "read") else bytes(v)

    assert len(ds) == 60
    samples = [ds[i] for i in range(len(ds))]
    metas = [json.loads(raw(s[".json"])) for s in samples]
    assert [s["__key__"] for s in samples] == [m["key"] for m in metas]
    check_labels(tiny_build, [(int(raw(s[".cls"])), m) for s, m in zip(samples, metas)])


def test_hf_datasets(tiny_build, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    files = [str(tiny_build / s["name"]) for s in shards(tiny_build)]
    ds = load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 60
    assert set(ds.column_names) >= {"__key__", "jpg", "cls", "json"}
    first = ds[0]
    assert first["jpg"].size == (first["json"]["width"], first["json"]["height"])
    check_labels(tiny_build, list(zip(ds["cls"], ds["json"])))


def test_dali_webdataset_reader_cpu(tiny_build):
    pytest.importorskip("nvidia.dali")
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    tars = [str(tiny_build / s["name"]) for s in shards(tiny_build)]
    idxs = [t[: -len(".tar")] + ".idx" for t in tars]
    batch = 16

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        jpg, cls, meta = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "cls", "json"],
                                               missing_component_behavior="error", random_shuffle=False,
                                               name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, meta

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == 60
    samples, shapes = [], []
    for _ in range(math.ceil(60 / batch)):
        imgs, cls, meta = p.run()
        for i in range(batch):
            samples.append((int(bytes(np.array(cls[i])).decode("ascii")),
                            json.loads(bytes(np.array(meta[i])).decode("utf-8"))))
            shapes.append(np.array(imgs[i]).shape)
    samples, shapes = samples[:60], shapes[:60]
    for (_, meta), shape in zip(samples, shapes):
        assert shape == (meta["height"], meta["width"], 3)
    check_labels(tiny_build, samples)
    del p


def test_idx_equals_dali_wds2idx(tiny_build, tmp_path):
    wds2idx = pytest.importorskip("wds2idx", reason="DALI's wds2idx tool is not installed")
    for s in shards(tiny_build):
        tar = tiny_build / s["name"]
        ours = tar.with_suffix(".idx").read_text()
        theirs = tmp_path / (tar.stem + ".idx")
        creator = wds2idx.IndexCreator(str(tar), str(theirs), verbose=False)
        creator.create_index()
        creator.close()
        assert ours == theirs.read_text()
        assert ours.splitlines()[0] == f"v1.2 {s['samples']}"


def test_tar_members_have_fixed_metadata(tiny_build):
    import tarfile

    with tarfile.open(tiny_build / shards(tiny_build)[0]["name"]) as tf:
        members = tf.getmembers()
    assert len(members) == 3 * 16
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in members} == \
        {(0, 0, 0, "maws", "maws", 0o444, tarfile.REGTYPE)}
    assert [m.name.split(".", 1)[1] for m in members[:3]] == ["cls", "jpg", "json"]
    assert all("." not in m.name.split(".", 1)[0] for m in members)
    assert os.path.commonprefix([m.name for m in members[:3]]).endswith(".")
