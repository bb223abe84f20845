"""Decontamination on a real build: Imagenette val images injected (as variants) into an Instagram
source, found by `decontaminate` / `maws-data decontaminate`; then removed by `filter_shard`."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import polars as pl
import pytest
from dedup_images import IMAGENETTE_VAL, SHARED_DATA, VARIANTS, make_variant
from maws_data import sidecar
from maws_data.cli import app
from maws_data.dedup.decontam import EVAL_THRESHOLD, REASON, EvalIndex, decontaminate, list_images
from maws_data.dedup.filter import filter_shard
from maws_data.shards import dali_index
from maws_data.vocab import Vocabulary
from typer.testing import CliRunner

REAL_ROWS = 14


@pytest.fixture(scope="module")
def contaminated(real_images, tmp_path_factory):
    """A real build: 14 Instagram rows with, after rows 3, 7, ..., one injected variant each of 6
    Imagenette val images (exact, q50, half, crop, gray, flip); shard_size 5."""
    from maws_data.build import BuildConfig, build

    root = tmp_path_factory.mktemp("decontam")
    src = root / "source"
    (src / "inj").mkdir(parents=True)
    (src / "images").symlink_to(SHARED_DATA / "instagram" / "images", target_is_directory=True)
    real = pl.read_parquet(SHARED_DATA / "instagram" / "captions.parquet").head(REAL_ROWS)
    evals = sorted(IMAGENETTE_VAL.glob("*/*.JPEG"))[5::650][:len(VARIANTS)]
    rows = []
    injected = {}
    for i, r in enumerate(real.iter_rows(named=True)):
        rows.append({"key": r["key"], "image": r["image"], "caption": r["caption"] or "#dog"})
        if i % 2 == 1 and len(injected) < len(VARIANTS):
            kind, ev = VARIANTS[len(injected)], evals[len(injected)]
            (src / "inj" / f"{kind}.jpg").write_bytes(make_variant(ev.read_bytes(), kind))
            rows.append({"key": f"inj-{kind}", "image": f"inj/{kind}.jpg", "caption": "#dog #golf #church"})
            injected[f"inj-{kind}"] = ev
    pl.DataFrame(rows).write_parquet(src / "captions.parquet")
    out = build(BuildConfig(source=str(src / "captions.parquet"), out=str(root / "build"), image_size=64,
                            shard_size=5, min_count=1, decoder="pil", processes=1, progress=False))
    # the eval sets: an ImageFolder subtree (2 classes, the injected sources among them) + a flat folder
    tree, flat = root / "eval_tree", root / "eval_flat"
    for ev in evals[:3] + sorted(IMAGENETTE_VAL.glob("*/*.JPEG"))[1::700][:6]:
        (tree / ev.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(ev, tree / ev.parent.name / ev.name)
    flat.mkdir()
    for ev in evals[3:] + sorted(IMAGENETTE_VAL.glob("*/*.JPEG"))[2::900][:4]:
        shutil.copy(ev, flat / ev.name)
    (flat / "notes.txt").write_text("not an image\n")
    (flat / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    names = {k: (tree / ev.parent.name / ev.name if i < 3 else flat / ev.name) for i, (k, ev) in enumerate(injected.items())}
    return {"build": out, "tree": tree, "flat": flat, "eval_of": names}


def test_every_injected_variant_is_reported(contaminated):
    c = contaminated
    report = decontaminate(c["build"], [c["tree"], c["flat"]])
    found = {m["key"]: m for m in report["matches"]}
    # exact, q50, half, gray: plain copies; crop and flip: through the eval image's crop / mirror views
    assert set(found) == set(c["eval_of"]), report["matches"]
    for key, m in found.items():
        assert m["eval_file"] == str(c["eval_of"][key]) and 0 <= m["distance"] <= EVAL_THRESHOLD
        assert m["shard"].startswith("shards/shard-")
    assert report["samples"] == REAL_ROWS + len(VARIANTS)  # every sample was hashed
    assert report["by_eval_set"] == {str(c["tree"]): 3, str(c["flat"]): 3}
    assert report["eval_unreadable"] == [str(c["flat"] / "broken.jpg")]
    assert report["eval_images"] == 9 + 7


def test_builds_without_stored_hashes_are_decoded_and_hashed(contaminated, tmp_path):
    # the builder's stored phashes (sidecar v2) and hashes of the decoded JPEGs (older builds: v1
    # sidecars, or none) find the same copies
    c = contaminated
    stored = decontaminate(c["build"], [c["tree"], c["flat"]])
    assert stored["hashed_shards"] == 0
    for kind in ("v1", "none"):
        old = tmp_path / kind
        shutil.copytree(c["build"], old, symlinks=True)
        for side_path in (old / "shards").glob(f"*{sidecar.SUFFIX}"):
            s = sidecar.decode(side_path.read_bytes())
            side_path.unlink()
            if kind == "v1":
                idx = (old / "shards" / side_path.name.replace(sidecar.SUFFIX, ".idx")).read_text()
                side_path.write_bytes(sidecar.encode(idx, [s.labels_of(i).tolist() for i in range(len(s))],
                                                     s.size.tolist()))
                assert sidecar.decode(side_path.read_bytes()).phash is None
        decoded = decontaminate(old, [c["tree"], c["flat"]])
        assert decoded["hashed_shards"] == len(json.loads((old / "manifest.json").read_text())["shards"])
        assert [(m["key"], m["eval_file"]) for m in decoded["matches"]] == \
            [(m["key"], m["eval_file"]) for m in stored["matches"]]


def test_list_images_and_index_roundtrip(contaminated, tmp_path):
    files = list_images(contaminated["flat"])
    assert all(f.suffix.lower() in (".jpeg", ".jpg") for f in files) and files == sorted(files)
    index = EvalIndex.build([contaminated["tree"]])
    index.save(tmp_path / "index.npz")
    again = EvalIndex.load(tmp_path / "index.npz")
    assert again.files == index.files and np.array_equal(again.hashes, index.hashes)
    ids, dist = again.match(index.hashes[:, 0])  # each eval image matches itself at distance 0
    assert ids.tolist() == list(range(len(index))) and (dist == 0).all()


def test_cli_report_and_errors(contaminated, tmp_path):
    c = contaminated
    runner = CliRunner()
    out = tmp_path / "report.json"
    res = runner.invoke(app, ["decontaminate", str(c["build"]), "--against", str(c["tree"]),
                              "--against", str(c["flat"]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"{len(VARIANTS)} of {REAL_ROWS + len(VARIANTS)} samples" in res.output
    report = json.loads(out.read_text())
    assert report["contaminated"] == len(VARIANTS) and report["threshold"] == EVAL_THRESHOLD
    res = runner.invoke(app, ["decontaminate", str(c["build"]), "--against", str(c["flat"]), "--threshold", "2",
                              "--out", str(out)])
    assert res.exit_code == 0 and json.loads(out.read_text())["threshold"] == 2
    for args, needle in (([str(c["build"]), "--against", str(tmp_path / "nope")], str(tmp_path / "nope")),
                         ([str(tmp_path), "--against", str(c["flat"])], str(tmp_path)),
                         ([str(c["build"]), "--against", str(tmp_path)], str(tmp_path)),
                         ([str(c["build"]), "--against", str(c["flat"]), "--threshold", "64"], "64")):
        res = runner.invoke(app, ["decontaminate", *args])
        assert res.exit_code == 2, res.output
        assert needle in res.output and "Traceback" not in res.output


def _tar_keys(path) -> list[str]:
    with tarfile.open(path) as tf:
        return [m.name for m in tf]


def test_filter_shard_makes_clean_shards(contaminated, tmp_path):
    c = contaminated
    report = decontaminate(c["build"], [c["tree"], c["flat"]])
    copies = [tmp_path / "a", tmp_path / "b"]
    for d in copies:
        shutil.copytree(c["build"], d, symlinks=True)
    counts = Vocabulary.load(c["build"]).counts
    by_shard: dict[int, dict[str, dict]] = {}
    for i, m in enumerate(report["matches"]):
        idx = int(m["shard"].split("-")[1].split(".")[0])
        by_shard.setdefault(idx, {})[m["key"]] = {"row": 1000 + i, "key": m["key"], "reason": REASON,
                                                   "detail": f"within {m['distance']} bits of {m['eval_file']}"}
    for d in copies:
        for idx, drop in by_shard.items():
            before = json.loads((d / "shards" / f"shard-{idx:06d}.json").read_text())
            stats = filter_shard(d / "shards", idx, drop, class_counts=counts)
            tar = d / "shards" / f"shard-{idx:06d}.tar"
            assert stats["samples"] == before["samples"] - len(drop)
            if stats["samples"]:
                names = _tar_keys(tar)
                assert not any(n.split(".")[0] in drop for n in names) and len(names) == 3 * stats["samples"]
                idx_text = (d / "shards" / f"shard-{idx:06d}.idx").read_text()
                assert idx_text == dali_index(tar)
                side = sidecar.decode((d / "shards" / f"shard-{idx:06d}{sidecar.SUFFIX}").read_bytes())
                assert [k.decode() for k in side.key] == [n.split(".")[0] for n in names[::3]]
                assert stats["sqrt_weight"] == pytest.approx(sidecar.stats_fields(
                    [side.labels_of(i).tolist() for i in range(len(side))], counts)["sqrt_weight"])
            else:
                assert not tar.exists() and stats["shard"] is None
            assert stats["skipped"][REASON] == len(drop)
            assert [r["key"] for r in stats["skipped_rows"] if r["reason"] == REASON] == sorted(drop, key=lambda k: drop[k]["row"])
            assert filter_shard(d / "shards", idx, drop, class_counts=counts) == stats  # a rerun is a no-op
    # byte-deterministic: two copies filtered alike are identical, file by file
    for f in sorted((copies[0] / "shards").iterdir()):
        assert f.read_bytes() == (copies[1] / "shards" / f.name).read_bytes(), f.name
    assert not list((copies[0] / "shards").glob(".*"))  # no temporary files left
    clean = decontaminate(copies[0], [c["tree"], c["flat"]])
    assert clean["contaminated"] == 0 and clean["samples"] == REAL_ROWS


def test_filter_shard_needs_counts_for_sqrt_weight(contaminated, tmp_path):
    shutil.copytree(contaminated["build"], tmp_path / "b", symlinks=True)
    key = _tar_keys(tmp_path / "b" / "shards" / "shard-000000.tar")[0].split(".")[0]
    with pytest.raises(ValueError, match="class_counts"):
        filter_shard(tmp_path / "b" / "shards", 0, {key: {"row": 0, "key": key, "reason": REASON, "detail": ""}})


def test_a_filtered_tar_is_the_tar_written_without_those_samples(contaminated, tmp_path):
    """filter_shard copies the kept samples' bytes: the result equals a tar written from scratch
    (shards.add_sample, as write_shard writes) with only the kept samples, and its index is dali_index's."""
    import io

    from maws_data.shards import add_sample

    d = tmp_path / "b"
    shutil.copytree(contaminated["build"], d, symlinks=True)
    tar_path = d / "shards" / "shard-000000.tar"
    with tarfile.open(tar_path) as tf:
        members: dict[str, dict[str, bytes]] = {}
        for m in tf:
            key, _, ext = m.name.partition(".")
            members.setdefault(key, {})[ext] = tf.extractfile(m).read()
    keys = list(members)
    drop = {k: {"row": i, "key": k, "reason": REASON, "detail": "test"} for i, k in enumerate(keys) if i % 3 != 1}
    filter_shard(d / "shards", 0, drop, class_counts=Vocabulary.load(d).counts)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for k in keys:
            if k not in drop:
                add_sample(tar, k, members[k])
    assert tar_path.read_bytes() == buf.getvalue()
    assert (d / "shards" / "shard-000000.idx").read_text() == dali_index(tar_path)


def test_decontaminate_reads_a_build_on_s3(contaminated, s3_prefix):
    """The same report from the build copied to S3 (sidecar offsets -> ranged reads of the tars)."""
    from maws_data import storage

    fs, base = storage.filesystem(s3_prefix)
    build = contaminated["build"]
    for f in sorted(build.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{base}/{f.relative_to(build).as_posix()}")
    local = decontaminate(build, [contaminated["tree"], contaminated["flat"]])
    remote = decontaminate(s3_prefix, [contaminated["tree"], contaminated["flat"]])
    assert remote["matches"] == local["matches"] and remote["samples"] == local["samples"]
