"""Builds made before the per-shard sidecars: the loader says how to upgrade them, `maws-data upgrade` does."""

from __future__ import annotations

import json
import shutil

import pytest
from maws_data.cli import app
from maws_data.loader import LoaderConfig, build_loader
from typer.testing import CliRunner


def make_old(build, out):
    """A copy of the build as the builder wrote it before sidecars: no .samples.npz, no sqrt weights."""
    shutil.copytree(build, out)
    for p in (out / "shards").glob("*.samples.npz"):
        p.unlink()
    for p in (out / "shards").glob("*.json"):
        stats = json.loads(p.read_text())
        stats.pop("sqrt_weight", None), stats.pop("label_counts", None)
        p.write_text(json.dumps(stats))
    manifest = json.loads((out / "manifest.json").read_text())
    for e in manifest["shards"]:
        e.pop("sqrt_weight")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def batches(build):
    loader = build_loader(LoaderConfig(shards=str(build), task="wsp", batch_size=4, image_size=16, resample="sqrt",
                                       backend="webdataset", num_workers=0))
    return [(list(loader.last_batch_keys), y) for _, y in loader]


def test_old_build_is_refused_with_the_upgrade_command_then_upgraded(tiny_build, tmp_path):
    old = make_old(tiny_build, tmp_path / "old")
    with pytest.raises(ValueError, match=r"run `maws-data upgrade .*old` once"):
        batches(old)
    with pytest.raises(ValueError, match="maws-data upgrade"):  # a glob of its tars: same advice
        build_loader(LoaderConfig(shards=str(old / "shards" / "*.tar"), task="mae", batch_size=4))
    result = CliRunner().invoke(app, ["upgrade", str(old)])
    assert result.exit_code == 0, result.output
    assert "4 sidecars written" in result.output
    for name in ("shard-000000.samples.npz", "shard-000003.samples.npz"):  # byte for byte the builder's
        assert (old / "shards" / name).read_bytes() == (tiny_build / "shards" / name).read_bytes()
    got, want = batches(old), batches(tiny_build)
    assert [k for k, _ in got] == [k for k, _ in want]
    assert all((a == b).all() for (_, a), (_, b) in zip(got, want))
    assert CliRunner().invoke(app, ["upgrade", str(tmp_path / "nothing")]).exit_code == 2
