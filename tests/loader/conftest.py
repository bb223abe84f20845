"""Loader fixtures: the tiny build served over HTTP (with byte ranges) and uploaded to the S3 server."""

from __future__ import annotations

import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with single `Range: bytes=a-b` requests (as S3, nginx and CDNs serve them).

    `drop` maps a path suffix to how many more GETs of it are cut off half way (the connection closed
    mid-body), to test the loader's retries. `served` lists the paths of GETs, `ranges` their
    (path, first byte, end) as served."""

    drop: ClassVar[dict[str, int]] = {}
    served: ClassVar[list[str]] = []
    ranges: ClassVar[list[tuple[str, int, int]]] = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return super().do_GET()
        self.served.append(self.path)
        size = os.path.getsize(path)
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end = int(a), min(int(b) if b else size - 1, size - 1)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.ranges.append((self.path, start, start + len(body)))
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        for suffix, left in list(self.drop.items()):
            if self.path.endswith(suffix) and left > 0:
                self.drop[suffix] = left - 1
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(2)  # dropped mid-body
                self.close_connection = True
                return
        self.wfile.write(body)

    def do_HEAD(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return super().do_HEAD()
        self.send_response(200)
        self.send_header("Content-Length", str(os.path.getsize(path)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()


@pytest.fixture(scope="session")
def http_build(tiny_build: Path):
    """`http://127.0.0.1:PORT/build`: the tiny build served by a local HTTP server with byte ranges."""
    handler = type("Handler", (RangeHandler,), {"drop": {}, "served": [], "ranges": []})
    server = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 256})(  # (default backlog: 5)
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(tiny_build.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{tiny_build.name}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def s3_build(tiny_build: Path, s3_prefix: str) -> str:
    """The tiny build uploaded to a fresh S3 prefix (real SeaweedFS)."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(tiny_build), s3_prefix.removeprefix("s3://") + "/build", recursive=True)
    return s3_prefix + "/build"
