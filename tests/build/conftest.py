"""Fixtures for the build tests: a source with injected bad rows, and a local image HTTP server."""

from __future__ import annotations

import os
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
INSTAGRAM = SHARED_DATA / "instagram"
CAPTIONS = INSTAGRAM / "captions.parquet"
NLTK_DATA = SHARED_DATA / "nltk_data"



def make_bad_source(folder: Path) -> Path:
    """30 rows: 0-19 real ones, then (20) a missing path, (21) a truncated JPEG, (22) a text file,
    (23) row 0's key again, (24) a null caption, (25) a null key, (26) key "we.ird/key name" and
    (27) key "we_ird_key_name" (both good rows, keys to sanitise and de-collide), (28) an empty file,
    (29) a non-UTF-8 caption. The caption column is binary, so one caption can be invalid UTF-8.
    With shard_size 5, rows 20-24 make a shard with no sample at all."""
    import polars as pl

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").symlink_to(INSTAGRAM / "images", target_is_directory=True)
    bad = folder / "bad"
    bad.mkdir()
    real = pl.read_parquet(CAPTIONS).head(22)
    jpeg = (INSTAGRAM / real["image"][21]).read_bytes()
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (bad / "notes.jpg").write_text("this is a text file, not an image\n")
    (bad / "empty.jpg").write_bytes(b"")
    keys = real["key"].head(20).to_list()
    images = real["image"].head(20).to_list()
    captions = [c.encode() for c in real["caption"].head(20).to_list()]
    extra = [
        ("missing-1", "images/does-not-exist.jpg", b"#dog"),
        ("trunc-1", "bad/truncated.jpg", b"#dog"),
        ("text-1", "bad/notes.jpg", b"#dog"),
        (keys[0], images[1], b"#dog duplicate of row 0"),
        ("nullcap-1", images[2], None),
        (None, images[3], b"#dog"),
        ("we.ird/key name", images[4], b"#dog #puppy"),
        ("we_ird_key_name", images[5], b"#cat"),
        ("empty-1", "bad/empty.jpg", b"#dog"),
        ("badutf8-1", images[6], b"#dog \xff\xfe"),
    ]
    for k, i, c in extra:
        keys.append(k)
        images.append(i)
        captions.append(c)
    table = pa.table({"key": pa.array(keys, pa.string()), "image": pa.array(images, pa.string()),
                      "caption": pa.array(captions, pa.binary())})
    path = folder / "captions.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="session")
def bad_source(tmp_path_factory) -> Path:
    if not CAPTIONS.is_file() or not NLTK_DATA.is_dir():
        pytest.skip(f"real data not found at {INSTAGRAM} / {NLTK_DATA}")
    return make_bad_source(tmp_path_factory.mktemp("bad_source"))


class ImageServer:
    """Serves a folder on 127.0.0.1 (threaded); `delay_s` slows every response down."""

    def __init__(self, root: Path, delay_s: float = 0.0):
        self.delay_s = delay_s
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                if server.delay_s:
                    time.sleep(server.delay_s)
                super().do_GET()

            def log_message(self, *args):  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def folder_server() -> type[ImageServer]:
    """`with folder_server(path) as server:` serves any folder on 127.0.0.1 (a fixture, because
    `from conftest import ...` picks whichever conftest module pytest imported first)."""
    return ImageServer


@pytest.fixture
def image_server():
    """A server for ../shared/data/instagram (so `<url>/images/<file>.jpg` works)."""
    if not CAPTIONS.is_file():
        pytest.skip(f"real data not found at {INSTAGRAM}")
    with ImageServer(INSTAGRAM) as s:
        yield s


# --- A real 2-node Ray cluster on this machine (head + one worker node, 1 CPU each) ---


class RayCluster:
    """`ray start --head` plus `ray start --address` (RAY_AUTH_MODE=token), in a temp dir of its own.

    Only processes this cluster started are stopped, by pid: those whose command line names its temp
    dir or port, and their descendants (never `ray stop`, which would stop other users' clusters)."""

    def __init__(self, tmp: Path):
        import socket
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.tmp = tmp
        self.ray = str(Path(sys.executable).parent / "ray")
        self.env = {**os.environ, "RAY_AUTH_MODE": "token"}
        self.address = ""

    def start(self) -> None:
        import subprocess

        head = subprocess.run([self.ray, "start", "--head", "--num-cpus", "1", "--port", str(self.port),
                               "--include-dashboard=false", "--temp-dir", str(self.tmp), "--disable-usage-stats"],
                              check=False, env=self.env, capture_output=True, text=True, timeout=180)
        if head.returncode:
            raise RuntimeError(f"ray start --head failed: {head.stdout[-2000:]} {head.stderr[-2000:]}")
        import re

        found = re.search(r"--address='([^']+)'", head.stdout + head.stderr)
        self.address = found.group(1) if found else f"127.0.0.1:{self.port}"
        worker = subprocess.run([self.ray, "start", "--address", self.address, "--num-cpus", "1",
                                 "--disable-usage-stats"], check=False, env=self.env, capture_output=True, text=True, timeout=180)
        if worker.returncode:
            self.stop()
            raise RuntimeError(f"ray start --address failed: {worker.stdout[-2000:]} {worker.stderr[-2000:]}")

    def processes(self) -> list:
        import psutil

        def ours(p) -> bool:
            cmd = " ".join(p.info["cmdline"] or [])
            return str(self.tmp) in cmd or f":{self.port}" in cmd

        roots = [p for p in psutil.process_iter(["pid", "cmdline"]) if ours(p)]
        found = {p.pid: p for p in roots}
        for p in roots:
            try:
                found.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return list(found.values())

    def worker_raylet(self):
        """The worker node's raylet (its socket is `raylet.1`; the head's is `raylet`)."""
        for p in self.processes():
            cmd = " ".join(p.info.get("cmdline") or []) if hasattr(p, "info") else ""
            if "raylet/raylet" in cmd and "sockets/raylet.1" in cmd:
                return p
        raise RuntimeError("no worker-node raylet found")

    def stop(self) -> None:
        import psutil

        procs = self.processes()
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=20)


@pytest.fixture
def ray_cluster():
    """A fresh 2-node Ray cluster (skips, with the reason, when it cannot start)."""
    import shutil
    import tempfile

    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    tmp = Path(tempfile.mkdtemp(prefix="mray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    cluster = RayCluster(tmp)
    try:
        cluster.start()
    except (RuntimeError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"cannot start a local Ray cluster: {e}")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        shutil.rmtree(tmp, ignore_errors=True)
