"""maws_data.images on real Instagram photos, hand-made bad files, and a local HTTP server."""

import io
import os
import pickle
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from maws_data.images import (
    ImageConfig,
    SkipSample,
    choose_decoder,
    load_and_process_many,
    load_image_bytes,
    load_many,
    process_image,
    process_images_dali,
    target_size,
)
from PIL import Image, ImageOps, features

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
IMAGES = SHARED / "instagram" / "images"


@pytest.fixture(scope="module")
def real_paths() -> list[Path]:
    paths = sorted(IMAGES.glob("*.jpg"))[:6] if IMAGES.is_dir() else []
    if not paths:
        pytest.skip(f"real images not found in {IMAGES}")
    return paths


@pytest.fixture(scope="module")
def real_jpeg(real_paths) -> bytes:
    return real_paths[0].read_bytes()


def _skip_reason(fn, *args, **kwargs) -> str:
    with pytest.raises(SkipSample) as e:
        fn(*args, **kwargs)
    assert e.value.detail  # every skip says what happened
    return e.value.reason


# ----------------------------------------------------------------------------- loading


def test_local_paths(real_paths, tmp_path):
    cfg = ImageConfig()
    folder = real_paths[0].parent
    rel = f"{folder.name}/{real_paths[0].name}"
    assert load_image_bytes(rel, base_dir=str(folder.parent), cfg=cfg) == real_paths[0].read_bytes()
    assert load_image_bytes(str(real_paths[0]), base_dir="/nonexistent", cfg=cfg) == real_paths[0].read_bytes()
    assert load_image_bytes(real_paths[0].as_uri(), base_dir="/nonexistent", cfg=cfg) == real_paths[0].read_bytes()
    assert _skip_reason(load_image_bytes, "images/none.jpg", base_dir=str(folder.parent), cfg=cfg) == "missing_path"
    assert _skip_reason(load_image_bytes, None, base_dir=".", cfg=cfg) == "null_image"
    (tmp_path / "my photo%.jpg").write_bytes(real_paths[1].read_bytes())
    assert load_image_bytes((tmp_path / "my photo%.jpg").as_uri(), base_dir=".", cfg=cfg) == real_paths[1].read_bytes()
    assert load_image_bytes("my photo%.jpg", base_dir=str(tmp_path), cfg=cfg) == real_paths[1].read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert _skip_reason(load_image_bytes, "empty.jpg", base_dir=str(tmp_path), cfg=cfg) == "empty"
    small_cap = ImageConfig(max_download_bytes=1000)
    assert _skip_reason(load_image_bytes, str(real_paths[0]), base_dir=".", cfg=small_cap) == "too_large"



def test_local_non_files_are_skipped_without_blocking(real_paths, tmp_path):
    """A folder or a FIFO where an image file should be: skipped as missing_path, and opening the FIFO
    (no writer) must not block the worker."""
    cfg = ImageConfig()
    (tmp_path / "a_dir.jpg").mkdir()
    os.mkfifo(tmp_path / "pipe.jpg")
    for name in ("a_dir.jpg", "pipe.jpg"):
        with pytest.raises(SkipSample) as e:
            load_image_bytes(name, base_dir=str(tmp_path), cfg=cfg)
        assert (e.value.reason, e.value.detail) == ("missing_path", f"{tmp_path / name}: not a file")
    # a file of megabytes comes back whole
    big = tmp_path / "big.bin"
    big.write_bytes(real_paths[0].read_bytes() * 40)
    assert load_image_bytes(str(big), base_dir=".", cfg=cfg) == big.read_bytes()

def test_malformed_references_are_skipped_not_raised():
    """References the OS or http.client reject outright: a row to skip, never an exception out of a worker."""
    cfg = ImageConfig(timeout_s=0.5, retries=3)
    assert _skip_reason(load_image_bytes, "http://127.0.0.1:abc/x.jpg", base_dir=".", cfg=cfg) == "download_failed"
    assert _skip_reason(load_image_bytes, "http://[::1/x.jpg", base_dir=".", cfg=cfg) == "download_failed"
    assert _skip_reason(load_image_bytes, "images/a\0b.jpg", base_dir=".", cfg=cfg) == "missing_path"


def test_raw_bytes(real_jpeg):
    cfg = ImageConfig()
    assert load_image_bytes(real_jpeg, base_dir=".", cfg=cfg) == real_jpeg
    assert load_image_bytes(memoryview(real_jpeg), base_dir=".", cfg=cfg) == real_jpeg
    assert _skip_reason(load_image_bytes, b"", base_dir=".", cfg=cfg) == "empty"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    image = b""
    hits: ClassVar[dict[str, int]] = {}
    lock = threading.Lock()
    active = most_active = 0  # requests being held by /wait.jpg now, and at most so far

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, *, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        try:
            self._route(self.path.split("?")[0])
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (cap, timeout): expected
            self.close_connection = True

    def _route(self, path: str) -> None:
        n = self.hits[path] = self.hits.get(path, 0) + 1
        if path == "/img.jpg":
            self._send(200, self.image)
        elif path == "/wait.jpg":  # holds the request a while, counting how many are held at once
            with _Handler.lock:
                _Handler.active += 1
                _Handler.most_active = max(_Handler.most_active, _Handler.active)
            time.sleep(0.2)
            with _Handler.lock:
                _Handler.active -= 1
            self._send(200, self.image)
        elif path == "/flaky-each.jpg":  # a 500 on the first request of each query string
            first = self.hits.setdefault(self.path, 0) == 0
            self.hits[self.path] += 1
            self._send(500, b"oops") if first else self._send(200, self.image)
        elif path == "/slow.jpg":
            time.sleep(1.5)
            self._send(200, self.image)
        elif path == "/big.jpg":
            self._send(200, b"\xff" * 300_000)
        elif path == "/big-nolength.jpg":  # lies about nothing, just streams past the cap
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b"\xff" * 10_000)
            self.close_connection = True
        elif path == "/flaky.jpg":  # a 500 first, then the image
            self._send(500, b"oops") if n == 1 else self._send(200, self.image)
        elif path == "/always500.jpg":
            self._send(503, b"down")
        elif path == "/redirect.jpg":  # relative Location
            self.send_response(302)
            self.send_header("Location", "/img.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop.jpg":
            self.send_response(301)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/loop.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/to-file.jpg":  # a redirect out of HTTP must not read the worker's disk
            self.send_response(302)
            self.send_header("Location", "file:///etc/hostname")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/no-location.jpg":
            self._send(302, b"")
        elif path == "/busy.jpg":  # 429 first, then the image
            self._send(429, b"slow down") if n == 1 else self._send(200, self.image)
        elif path == "/img-then-hangup.jpg":  # keep-alive response, then the server drops the connection
            self._send(200, self.image)
            self.close_connection = True
        else:
            self._send(404, b"not found")


@pytest.fixture(scope="module")
def server(real_jpeg):
    _Handler.image = real_jpeg
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_download(server, real_jpeg):
    cfg = ImageConfig(timeout_s=0.5, retries=1, max_download_bytes=200_000)
    assert load_image_bytes(f"{server}/img.jpg", base_dir=".", cfg=cfg) == real_jpeg
    assert load_image_bytes(f"{server}/img.jpg?x=1", base_dir=".", cfg=cfg) == real_jpeg  # reused connection
    assert _skip_reason(load_image_bytes, f"{server}/missing.jpg", base_dir=".", cfg=cfg) == "download_failed"
    assert _Handler.hits["/missing.jpg"] == 1  # 4xx is not retried
    assert _skip_reason(load_image_bytes, f"{server}/big.jpg", base_dir=".", cfg=cfg) == "too_large"
    assert _skip_reason(load_image_bytes, f"{server}/big-nolength.jpg", base_dir=".", cfg=cfg) == "too_large"
    t0 = time.monotonic()
    assert _skip_reason(load_image_bytes, f"{server}/slow.jpg", base_dir=".", cfg=cfg) == "download_failed"
    assert time.monotonic() - t0 < 3.0  # two 0.5 s attempts, not two 1.5 s waits for the slow body
    assert _Handler.hits["/slow.jpg"] == 2  # a timeout is retried
    # retry succeeds after one 500
    assert load_image_bytes(f"{server}/flaky.jpg", base_dir=".", cfg=cfg) == real_jpeg
    assert _Handler.hits["/flaky.jpg"] == 2
    assert _skip_reason(load_image_bytes, f"{server}/always500.jpg", base_dir=".", cfg=cfg) == "download_failed"
    assert _Handler.hits["/always500.jpg"] == 2
    # redirects are followed (relative Location), a loop is cut off; 429 is retried
    assert load_image_bytes(f"{server}/redirect.jpg", base_dir=".", cfg=cfg) == real_jpeg
    assert _skip_reason(load_image_bytes, f"{server}/loop.jpg", base_dir=".", cfg=cfg) == "download_failed"
    assert _Handler.hits["/loop.jpg"] == 6
    assert load_image_bytes(f"{server}/busy.jpg", base_dir=".", cfg=cfg) == real_jpeg
    for path, detail in [("to-file.jpg", "non-HTTP location"), ("no-location.jpg", "HTTP 302 without a Location"),
                         ("loop.jpg", "more than 5 redirects"), ("missing.jpg", "HTTP 404")]:
        with pytest.raises(SkipSample, match=detail) as e:
            load_image_bytes(f"{server}/{path}", base_dir=".", cfg=cfg)
        assert e.value.reason == "download_failed" and f"{server}/{path}" in e.value.detail
    assert _Handler.hits["/to-file.jpg"] == 1 and _Handler.hits["/no-location.jpg"] == 1  # not retried (retries=1)
    # after all that, the server still works (no connection left in a broken state)
    assert load_image_bytes(f"{server}/img.jpg", base_dir=".", cfg=cfg) == real_jpeg


def test_http_stale_keepalive_is_not_a_failure(server, real_jpeg):
    cfg = ImageConfig(timeout_s=2, retries=0)  # no retries: a reconnect must not need one
    for _ in range(3):
        assert load_image_bytes(f"{server}/img-then-hangup.jpg", base_dir=".", cfg=cfg) == real_jpeg


def test_many_on_threads_keeps_order(server, real_paths):
    cfg = ImageConfig(image_size=128, timeout_s=2, retries=0)
    folder = str(real_paths[0].parent)
    refs = [(p.name, folder) for p in real_paths] + [("nope.jpg", folder), (f"{server}/404.jpg", "."),
                                                     (f"{server}/img.jpg", "."), (None, ".")]
    loaded = load_many(refs, cfg, threads=4)
    assert loaded[: len(real_paths)] == [p.read_bytes() for p in real_paths]
    assert [x.reason for x in loaded[len(real_paths):] if isinstance(x, SkipSample)] == [
        "missing_path", "download_failed", "null_image"]
    assert loaded[-2] == real_paths[0].read_bytes()  # the server serves real_paths[0]
    processed = load_and_process_many(refs, cfg, threads=4)
    assert processed[: len(real_paths)] == [process_image(p.read_bytes(), cfg) for p in real_paths]
    assert processed[-2] == processed[0]
    assert [x.reason if isinstance(x, SkipSample) else None for x in processed[len(real_paths):]] == [
        "missing_path", "download_failed", None, "null_image"]
    # the two-stage pipeline (loads on 4 threads, decoding on this one) gives the very same list,
    # including a corrupt image that fails only in the decode stage
    refs.append((real_paths[0].read_bytes()[:200], "."))
    whole = load_and_process_many(refs, cfg, threads=4, hashes=True)
    assert whole[-1].reason in ("truncated", "decode_error")
    staged = load_and_process_many(refs, cfg, threads=4, hashes=True, pipelined=True)
    assert [r.reason if isinstance(r, SkipSample) else r for r in staged] == [
        r.reason if isinstance(r, SkipSample) else r for r in whole]



def test_many_downloads_in_flight_on_one_thread(server, real_paths, real_jpeg):
    """load_many keeps up to `threads` GETs in flight on this thread's libcurl multi handle (no
    download threads), retries each failed one on its own, mixes in local files and inline bytes,
    and gives every row the result a single load_image_bytes gives it."""
    cfg = ImageConfig(timeout_s=1.0, retries=1, max_download_bytes=200_000)
    folder = str(real_paths[0].parent)
    refs = ([(f"{server}/wait.jpg?i={i}", ".") for i in range(12)]
            + [(f"{server}/flaky-each.jpg?i={i}", ".") for i in range(3)]
            + [(p.name, folder) for p in real_paths[:3]]
            + [(f"{server}/missing.jpg", "."), (f"{server}/loop.jpg", "."), (f"{server}/big.jpg", "."),
               (f"{server}/to-file.jpg", "."), ("img.jpg", server), (real_jpeg, "."), (None, "."), ("nope.jpg", folder)])
    _Handler.most_active = 0
    ours_before = {t.ident for t in threading.enumerate() if t.name.startswith("maws-images")}
    loaded = load_many(refs, cfg, threads=6)
    assert {t.ident for t in threading.enumerate() if t.name.startswith("maws-images")} == ours_before  # no pool
    assert 2 <= _Handler.most_active <= 6  # overlapped, and never more than `threads` at once
    assert loaded[:15] == [real_jpeg] * 15  # each flaky URL: one 500, then the image
    assert all(_Handler.hits[f"/flaky-each.jpg?i={i}"] == 2 for i in range(3))
    assert loaded[15:18] == [p.read_bytes() for p in real_paths[:3]]
    assert [x.reason if isinstance(x, SkipSample) else x for x in loaded[18:]] == [
        "download_failed", "download_failed", "too_large", "download_failed", real_jpeg, real_jpeg,
        "null_image", "missing_path"]
    single = []
    for ref, base in refs[18:]:
        try:
            single.append(load_image_bytes(ref, base_dir=base, cfg=cfg))
        except SkipSample as e:
            single.append((e.reason, e.detail))
    assert [(x.reason, x.detail) if isinstance(x, SkipSample) else x for x in loaded[18:]] == single
    # a consumer that stops early leaves nothing behind for the next batch on this thread
    from maws_data.images import _loaded
    stream = _loaded(refs[:12], cfg, 6)
    next(stream)
    stream.close()
    assert load_many([(f"{server}/img.jpg", "."), (f"{server}/404.jpg", ".")], cfg, threads=6)[0] == real_jpeg
    # ... and so does one that is abandoned without being closed (its rows must not come back here)
    abandoned = _loaded([(f"{server}/404.jpg?{i}", ".") for i in range(12)], cfg, 6)
    next(abandoned)
    again = load_many([(f"{server}/img.jpg", ".")] * 3, cfg, threads=6)
    assert again == [real_jpeg] * 3
    abandoned.close()

def test_connection_refused():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ImageConfig(timeout_s=0.5, retries=0)
    assert _skip_reason(load_image_bytes, f"http://127.0.0.1:{port}/x.jpg", base_dir=".", cfg=cfg) == "download_failed"


# ----------------------------------------------------------------------------- processing


def _png_bomb(width: int, height: int) -> bytes:
    """A valid single-colour greyscale PNG of width x height that is only a few KiB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = zlib.compress(b"\x00" * (width + 1) * min(height, 64), 9)  # only part of the rows: never decoded
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_bad_inputs(real_jpeg):
    cfg = ImageConfig()
    assert _skip_reason(process_image, real_jpeg[: len(real_jpeg) // 2], cfg) == "truncated"
    assert _skip_reason(process_image, b"", cfg) == "empty"
    assert _skip_reason(process_image, b"just some text, not a JPEG\n", cfg) == "not_image"
    bomb = _png_bomb(20000, 20000)
    assert len(bomb) < 10_000
    assert _skip_reason(process_image, bomb, cfg) == "too_large"
    # under Pillow's hard limit (2x) but over ours
    assert _skip_reason(process_image, _png_bomb(3000, 3000), ImageConfig(max_pixels=1_000_000)) == "too_large"
    corrupt = real_jpeg[:20] + b"\x00" * 3000 + real_jpeg[3020:]  # JPEG magic, then broken headers
    assert _skip_reason(process_image, corrupt, cfg) == "decode_error"


def test_real_images_resized_exactly(real_paths):
    cfg = ImageConfig(image_size=200)
    for p in real_paths:
        src = Image.open(p)
        jpeg, w, h = process_image(p.read_bytes(), cfg)
        out = Image.open(io.BytesIO(jpeg))
        assert out.format == "JPEG" and out.mode == "RGB"
        assert out.size == (w, h) == target_size(*src.size, 200)
        assert min(w, h) == 200
        # content matches a plain high-quality resize of the original
        ref = np.asarray(src.convert("RGB").resize((w, h), Image.Resampling.LANCZOS), dtype=np.float32)
        assert np.abs(np.asarray(out, dtype=np.float32) - ref).mean() < 4.0


def test_no_upscaling_and_determinism(real_jpeg):
    jpeg, w, h = process_image(real_jpeg, ImageConfig(image_size=1000))
    assert (w, h) == Image.open(io.BytesIO(real_jpeg)).size == Image.open(io.BytesIO(jpeg)).size
    cfg = ImageConfig(image_size=160)
    assert process_image(real_jpeg, cfg) == process_image(real_jpeg, cfg)
    assert process_image(real_jpeg, cfg) != process_image(real_jpeg, ImageConfig(image_size=160, jpeg_quality=80))


def test_target_size_shorter_side():
    assert target_size(640, 480, 256) == (341, 256)
    assert target_size(480, 640, 256) == (256, 341)
    assert target_size(300, 300, 256) == (256, 256)
    assert target_size(200, 100, 256) == (200, 100)
    assert target_size(100000, 300, 256) == (85333, 256)


def _with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [1, 3, 6, 8, 2, 5])
def test_exif_orientation_applied(real_jpeg, orientation):
    stored = Image.open(io.BytesIO(real_jpeg)).convert("RGB").resize((600, 400))
    data = _with_orientation(stored, orientation)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    jpeg, w, h = process_image(data, ImageConfig(image_size=200))
    assert (w, h) == ((200, 300) if orientation in (5, 6, 7, 8) else (300, 200))
    got = np.asarray(Image.open(io.BytesIO(jpeg)), dtype=np.float32)
    ref = np.asarray(expected.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.abs(got - ref).mean() < 3.0  # same picture the same way up (a wrong turn gives ~30+)


def test_draft_large_jpeg_still_exact(real_jpeg):
    # a 1280x960 JPEG takes the draft() path (decoded at 1/2 or 1/4 scale) and still lands exactly
    big = Image.open(io.BytesIO(real_jpeg)).convert("RGB").resize((1280, 960))
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=95)
    jpeg, w, h = process_image(buf.getvalue(), ImageConfig(image_size=224))
    assert (w, h) == (299, 224) == Image.open(io.BytesIO(jpeg)).size
    ref = np.asarray(big.resize((w, h), Image.Resampling.LANCZOS), dtype=np.float32)
    assert np.abs(np.asarray(Image.open(io.BytesIO(jpeg)), dtype=np.float32) - ref).mean() < 4.0


def test_transparent_png_onto_white():
    im = Image.new("RGBA", (300, 300), (255, 0, 0, 0))  # fully transparent "red"
    buf = io.BytesIO()
    im.save(buf, "PNG")
    jpeg, w, h = process_image(buf.getvalue(), ImageConfig(image_size=256))
    assert (w, h) == (256, 256)
    assert np.asarray(Image.open(io.BytesIO(jpeg))).min() > 245  # white, not red or black


# ----------------------------------------------------------------------------- DALI


def test_skip_sample_pickles_and_config_checks():
    e = pickle.loads(pickle.dumps(SkipSample("too_large", "9x9 > cap")))
    assert (type(e), e.reason, e.detail, str(e)) == (SkipSample, "too_large", "9x9 > cap", "too_large: 9x9 > cap")
    for bad in ({"image_size": 0}, {"jpeg_quality": 101}, {"retries": -1}, {"timeout_s": 0}, {"decoder": "gpu"}):
        with pytest.raises(ValueError):
            ImageConfig(**bad)


def test_choose_decoder():
    assert choose_decoder(ImageConfig(decoder="pil")) == "pil"
    assert choose_decoder(ImageConfig(decoder="dali")) == "dali"
    import torch

    assert choose_decoder(ImageConfig(decoder="auto")) == ("dali" if torch.cuda.is_available() else "pil")
    # the build's driver decides without importing torch (~450 MB of RSS and seconds on a CPU machine)
    import subprocess
    import sys

    probe = ("import sys; from maws_data.images import ImageConfig, choose_decoder; "
             "print(choose_decoder(ImageConfig()), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == ("dali" if torch.cuda.is_available() else "pil")
    assert out[1] == "False" or torch.cuda.is_available()  # with a GPU, DALI may bring torch along


def _dali_vs_pil(datas: list[bytes], cfg: ImageConfig, device: str) -> None:
    results = process_images_dali(datas, cfg, device=device)
    assert len(results) == len(datas)
    for data, got in zip(datas, results):
        jpeg, w, h = process_image(data, cfg)
        assert not isinstance(got, SkipSample), got
        assert got[1:] == (w, h) == Image.open(io.BytesIO(got[0])).size
        a = np.asarray(Image.open(io.BytesIO(jpeg)), dtype=np.float32)
        b = np.asarray(Image.open(io.BytesIO(got[0])), dtype=np.float32)
        assert np.abs(a - b).mean() < 3.0


def test_dali_cpu_matches_pil(real_paths, real_jpeg):
    pytest.importorskip("nvidia.dali")
    cfg = ImageConfig(image_size=200)
    rotated = _with_orientation(Image.open(io.BytesIO(real_jpeg)).convert("RGB").resize((600, 400)), 6)
    _dali_vs_pil([p.read_bytes() for p in real_paths[:4]] + [rotated], cfg, "cpu")


def test_dali_cpu_bad_images_are_per_sample(real_paths, real_jpeg):
    pytest.importorskip("nvidia.dali")
    cfg = ImageConfig(image_size=200)
    good = [p.read_bytes() for p in real_paths[:2]]
    # headers Pillow parses but a Huffman table libjpeg rejects: fails inside the DALI batch itself
    dht = real_jpeg.index(b"\xff\xc4")
    bogus = real_jpeg[: dht + 5] + b"\xff" * 16 + real_jpeg[dht + 21:]
    assert Image.open(io.BytesIO(bogus)).size == Image.open(io.BytesIO(real_jpeg)).size
    batch = [good[0], real_jpeg[: len(real_jpeg) // 2], b"", b"text", _png_bomb(20000, 20000), bogus, good[1]]
    results = process_images_dali(batch, cfg, device="cpu")
    reasons = [r.reason if isinstance(r, SkipSample) else None for r in results]
    assert reasons == [None, "truncated", "empty", "not_image", "too_large", "decode_error", None]
    assert _skip_reason(process_image, bogus, cfg) == "decode_error"
    assert results[0] == process_images_dali([good[0]], cfg, device="cpu")[0]  # deterministic
    assert results[6][1:] == process_image(good[1], cfg)[1:]


@pytest.mark.gpu
def test_dali_gpu_matches_pil(real_paths, real_jpeg):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    cfg = ImageConfig(image_size=200)
    rotated = _with_orientation(Image.open(io.BytesIO(real_jpeg)).convert("RGB").resize((600, 400)), 6)
    _dali_vs_pil([p.read_bytes() for p in real_paths] + [rotated], cfg, "gpu")
    batch = [real_paths[0].read_bytes(), real_jpeg[:2000], b"text"]
    reasons = [r.reason if isinstance(r, SkipSample) else None for r in process_images_dali(batch, cfg, device="gpu")]
    assert reasons == [None, "truncated", "not_image"]


@pytest.mark.parametrize("fmt,mode", [("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "P"), ("GIF", "P"),
                                      ("PNG", "I;16"), ("WEBP", "RGB"), ("BMP", "RGB"), ("TIFF", "RGB")])
def test_other_formats_and_modes(real_jpeg, fmt, mode):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow build has no WebP support")
    src = Image.open(io.BytesIO(real_jpeg)).convert("RGB").resize((400, 300))
    im = src.convert(mode) if mode != "I;16" else Image.fromarray(
        np.asarray(src.convert("L"), dtype=np.uint16) * 257)  # a uint16 array gives mode I;16
    buf = io.BytesIO()
    im.save(buf, fmt)
    jpeg, w, h = process_image(buf.getvalue(), ImageConfig(image_size=150))
    out = Image.open(io.BytesIO(jpeg))
    assert (out.format, out.mode, out.size, (w, h)) == ("JPEG", "RGB", (200, 150), (200, 150))
    ref = np.asarray(src.resize((200, 150), Image.Resampling.BICUBIC).convert(
        "L" if mode in ("L", "I;16") else "RGB").convert("RGB"), dtype=np.float32)
    tol = 12.0 if mode == "P" else 6.0  # palette quantisation
    assert np.abs(np.asarray(out, dtype=np.float32) - ref).mean() < tol
