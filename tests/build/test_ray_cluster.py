"""The Ray runner on a real 2-node cluster on this machine (tests/build/conftest.py: ray_cluster): the
worker node's raylet is killed mid-build; the build must finish and equal a clean local build byte for byte."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import psutil
import pytest
from maws_data.build import BuildConfig, build

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CAPTIONS = SHARED_DATA / "instagram" / "captions.parquet"
MAWS_DATA = Path(sys.executable).parent / "maws-data"


def digests(build_dir: Path) -> dict[str, str]:
    return {p.relative_to(build_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(build_dir.rglob("*")) if p.is_file() and p.name != "build.json"}


def test_worker_node_killed_mid_build_equals_local_build(ray_cluster, image_server, tmp_path):
    if not MAWS_DATA.exists():
        pytest.skip(f"console script not installed at {MAWS_DATA}")
    image_server.delay_s = 0.25  # each 4-row shard takes >= 0.25 s: time to kill the node mid-way
    src = tmp_path / "src"
    src.mkdir()
    df = pl.read_parquet(CAPTIONS).head(48).with_columns((pl.lit(image_server.url + "/") + pl.col("image")).alias("image"))
    for i in range(3):  # three files, 16 rows each
        df.slice(16 * i, 16).select("key", "image", "caption").write_parquet(src / f"part-{i}.parquet")
    args = {"image_size": 64, "shard_size": 4, "min_count": 2, "decoder": "pil", "progress": False}
    local = build(BuildConfig(source=str(src), out=str(tmp_path / "local"), processes=1, **args))

    out = tmp_path / "ray"
    cmd = [str(MAWS_DATA), "build", "--source", str(src), "--out", str(out), "--image-size", "64", "--shard-size", "4",
           "--min-count", "2", "--decoder", "pil", "--runner", "ray", "--ray-address", ray_cluster.address,
           "--no-progress"]
    log = (tmp_path / "build.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_AUTH_MODE": "token"})
    try:
        raylet = ray_cluster.worker_raylet()
        deadline = time.monotonic() + 240
        # wait until the image pass runs and the worker node holds a task
        while not (out / "shards" / "shard-000001.json").exists() or not _busy(raylet):
            assert proc.poll() is None, f"build exited early: {(tmp_path / 'build.log').read_text()}"
            assert time.monotonic() < deadline, "the worker node never got an image task"
            time.sleep(0.02)
        victims = [raylet, *raylet.children(recursive=True)]
        for p in victims:
            p.kill()
        psutil.wait_procs(victims, timeout=20)
        assert proc.wait(timeout=300) == 0, (tmp_path / "build.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    done = len(list((out / "shards").glob("*.json")))
    assert done == 12
    assert digests(out) == {k: v for k, v in digests(local).items()} | {"manifest.json": digests(out)["manifest.json"]}
    # the manifests differ only in the runner settings
    import json

    m_local, m_ray = (json.loads((d / "manifest.json").read_text()) for d in (local, out))
    for m in (m_local, m_ray):
        for k in ("runner", "ray_address", "processes"):
            m["config"].pop(k)
    assert m_local == m_ray


def _busy(raylet: psutil.Process) -> bool:
    """The node runs one of our tasks (a worker process named after the task function)."""
    try:
        return any("run_shard" in " ".join(c.cmdline()) for c in raylet.children(recursive=True))
    except psutil.NoSuchProcess:
        return False
