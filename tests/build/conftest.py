"""Fixtures for the build tests: a source with injected bad rows, and a local image HTTP server."""

from __future__ import annotations

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
def image_server():
    """A server for ../shared/data/instagram (so `<url>/images/<file>.jpg` works)."""
    if not CAPTIONS.is_file():
        pytest.skip(f"real data not found at {INSTAGRAM}")
    with ImageServer(INSTAGRAM) as s:
        yield s
