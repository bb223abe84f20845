"""Turn one row's image reference into checked, resized, re-encoded JPEG bytes.

Two steps, each usable alone:
  load_image_bytes(ref, base_dir=..., cfg=...)  local path / raw bytes / http(s) URL -> encoded bytes
  process_image(data, cfg)                       encoded bytes -> (jpeg, width, height), Pillow-SIMD
  process_image(data, cfg, hashes=True)          -> (jpeg, width, height, sha256 hex, phash): the dedup
                                                 hashes (maws_data.dedup.hashes) of the source bytes and
                                                 of the resized image
  process_images_dali(datas, cfg, device=...)    the same for a batch, decoded and resized by DALI
and for many rows at once (results in input order, SkipSample in place of a result), with up to
`threads` downloads in flight on the calling thread (`Downloads`, a libcurl multi handle):
  load_many(refs, cfg, threads=...)              [(ref, base_dir)] -> [bytes | SkipSample]
  load_and_process_many(refs, cfg, threads=..., pipelined=True)
                                                 [(ref, base_dir)] -> [(jpeg, w, h) | SkipSample],
                                                 decoding on the calling thread as the bytes arrive
(the batch functions take `hashes=True` too).

Every failure is a `SkipSample` with a short stable `.reason` (counted in the build manifest) and a
human `.detail`. Reasons:
  null_image       the image reference is null/empty
  missing_path     local file (or s3:// object) does not exist (or is not a file)
  download_failed  HTTP error status, connection error or timeout (after the retries), redirect loop
  too_large        body over `max_download_bytes`, or more than `max_pixels` pixels (decompression bomb)
  empty            zero bytes
  not_image        not a format Pillow can identify (e.g. a text file named .jpg)
  truncated        the image data ends early
  decode_error     identified but cannot be decoded (corrupt data, unsupported mode, ...)

Output (both decoders): RGB, EXIF orientation applied, shorter side == image_size (never upscaled;
smaller images keep their size), longer side round(long * image_size / short), JPEG at
`jpeg_quality`, 4:2:0, no metadata. The same bytes in give the same bytes out.

Memory: one image's pixels at a time; a batch holds its rows' encoded bytes until each is
processed (O(one shard)), and at most `threads` transfers.
"""

from __future__ import annotations

import heapq
import io
import os
import stat
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal

import certifi
import numpy as np
import pycurl
from PIL import Image, UnidentifiedImageError

from maws_data.dedup.hashes import content_hash, phash

MiB = 1 << 20
ORIENTATION_TAG = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# File signatures of common image formats: such a file that Pillow cannot open is a broken image
# ("decode_error"), not something else ("not_image").
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose does).
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class SkipSample(Exception):
    """A row whose image cannot be used; `reason` is a stable code, `detail` says what happened."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable across worker processes / Ray
        return (SkipSample, (self.reason, self.detail))


@dataclass(frozen=True)
class ImageConfig:
    image_size: int = 256  # shorter side after resize; smaller images are never upscaled
    jpeg_quality: int = 90
    max_pixels: int = 89_478_485  # decompression-bomb cap (Pillow's default MAX_IMAGE_PIXELS)
    max_download_bytes: int = 20 * MiB  # cap on one image's encoded size (downloads and local files)
    timeout_s: float = 10.0  # per download attempt: connect + the whole body
    retries: int = 2  # extra attempts after a connection error, timeout, 5xx, 408 or 429 (not other 4xx)
    decoder: Literal["auto", "pil", "dali"] = "auto"

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.max_pixels < 1 or self.max_download_bytes < 1:
            raise ValueError("max_pixels and max_download_bytes must be >= 1")
        if self.timeout_s <= 0 or self.retries < 0:
            raise ValueError(f"timeout_s must be > 0 and retries >= 0, got {self.timeout_s}, {self.retries}")
        if self.decoder not in ("auto", "pil", "dali"):
            raise ValueError(f"decoder must be 'auto', 'pil' or 'dali', got {self.decoder!r}")


# ---------------------------------------------------------------------------------------------
# Loading: path / bytes / URL -> encoded bytes


def load_image_bytes(ref: str | bytes | None, *, base_dir: str, cfg: ImageConfig) -> bytes:
    """The encoded image a reference stands for; raises SkipSample."""
    kind, where = _route(ref, base_dir)
    if kind == "http":
        data = download(where, cfg)
    elif kind == "s3":
        data = _read_s3(where, cfg)
    else:
        data = _read_here(ref, base_dir, cfg)
    return _checked(data, ref, cfg)


def _route(ref: str | bytes | None, base_dir: str) -> tuple[str, str]:
    """How a reference is loaded: ("http", url), ("s3", url) or ("here", "") for inline bytes, a
    local path and a null reference (read, or refused, on the calling thread)."""
    if not isinstance(ref, str) or not ref.strip():
        return "here", ""
    if ref.startswith(("http://", "https://")):
        return "http", ref
    if ref.startswith("s3://"):
        return "s3", ref
    if base_dir.startswith(("s3://", "http://", "https://")) and not ref.startswith(("/", "file://")):
        url = base_dir.rstrip("/") + "/" + ref  # an image next to a remote source file
        return ("s3" if url.startswith("s3://") else "http"), url
    return "here", ""


def _read_here(ref: str | bytes | None, base_dir: str, cfg: ImageConfig) -> bytes:
    if ref is None or (isinstance(ref, str) and not ref.strip()):
        raise SkipSample("null_image", "the image reference is null or empty")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    return _read_local(ref, base_dir, cfg)


def _checked(data: bytes, ref: str | bytes, cfg: ImageConfig) -> bytes:
    if not data:
        raise SkipSample("empty", f"{_describe(ref)}: zero bytes")
    if len(data) > cfg.max_download_bytes:
        raise SkipSample("too_large", f"{_describe(ref)}: {len(data)} bytes > cap {cfg.max_download_bytes}")
    return data


def _describe(ref: str | bytes) -> str:
    return ref if isinstance(ref, str) else f"<{len(ref)} raw bytes>"


def _read_local(ref: str, base_dir: str, cfg: ImageConfig) -> bytes:
    # file:// URIs are percent-encoded ("my%20photo.jpg"); plain paths are taken as they are.
    path = urllib.parse.unquote(ref.removeprefix("file://")) if ref.startswith("file://") else ref
    path = os.path.join(base_dir, path)  # an absolute path is kept as it is
    # One open, one fstat, one read (pathlib's stat + is_file + read_bytes cost 2.5x, ~30 us of the
    # ~700 us an image costs). O_NONBLOCK: opening a FIFO must not wait for a writer.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SkipSample("missing_path", f"{path}: no such file") from None
    except (OSError, ValueError) as e:  # ValueError: a path the OS cannot take (an embedded NUL byte)
        raise SkipSample("missing_path", f"{path!r}: cannot read ({e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SkipSample("missing_path", f"{path}: not a file")
        if st.st_size > cfg.max_download_bytes:
            raise SkipSample("too_large", f"{path}: {st.st_size} bytes > cap {cfg.max_download_bytes}")
        return _read_fd(fd, st.st_size)
    except OSError as e:
        raise SkipSample("missing_path", f"{path!r}: cannot read ({e})") from None
    finally:
        os.close(fd)


def _read_fd(fd: int, size: int) -> bytes:
    """The file's bytes to its end: one read when it still has the `size` bytes fstat gave."""
    data = os.read(fd, size + 1)  # the extra byte tells a file that grew since the fstat
    while len(data) != size and (more := os.read(fd, 1 << 20)):  # grew, or a short read
        data += more
    return data


def _read_s3(url: str, cfg: ImageConfig) -> bytes:
    """An s3:// object (an image URL, or a path next to a source file on object storage), via fsspec."""
    from maws_data import storage

    fs, path = storage.filesystem(url)
    try:
        size = fs.info(path)["size"]
        if size > cfg.max_download_bytes:
            raise SkipSample("too_large", f"{url}: {size} bytes > cap {cfg.max_download_bytes}")
        return fs.cat_file(path)
    except FileNotFoundError:
        raise SkipSample("missing_path", f"{url}: no such object") from None
    except OSError as e:
        raise SkipSample("download_failed", f"{url}: {type(e).__name__}: {e}") from None


class _RetryableError(Exception):
    pass


REDIRECT_STATUSES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
RETRYABLE_4XX = (408, 429)  # request timeout, too many requests: worth another attempt

# libcurl errors that another attempt cannot fix; every other one (timeouts, refused or reset
# connections, DNS, a short body) is retried.
_CURL_FINAL = {pycurl.E_URL_MALFORMAT: "invalid URL", pycurl.E_UNSUPPORTED_PROTOCOL: "redirected to a non-HTTP location",
               pycurl.E_TOO_MANY_REDIRECTS: f"more than {MAX_REDIRECTS} redirects"}
_CURL_TOO_LARGE = (pycurl.E_FILESIZE_EXCEEDED, pycurl.E_WRITE_ERROR)  # Content-Length over the cap / body over it

# Downloads run on libcurl's multi interface, driven by the thread that uses the bytes: `poll()`
# does the network I/O of every transfer in flight, in C, and returns the finished ones. The image
# pass polls between two images (~1 ms apart) while the responses wait in the kernel's socket
# buffers, so a worker keeps `threads` downloads in flight with no download threads: with a thread
# pool, every finished download had to win the GIL back from the decoding thread
# (docs/sources_images.md). The multi handle keeps its connections alive between requests and
# shards (a server's closed idle connection is reopened by libcurl without counting as a failed
# attempt), so repeated downloads from one host pay no handshake. One per thread, never shared.
_local = threading.local()


class _Job:
    """One URL's GET: its attempts so far and the body of the current one."""

    __slots__ = ("attempt", "cfg", "chunks", "last", "size", "tag", "url")

    def __init__(self, tag, url: str, cfg: ImageConfig):
        self.tag, self.url, self.cfg = tag, url, cfg
        self.attempt, self.last = 0, ""
        self.chunks: list[bytes] = []
        self.size = 0

    def write(self, data: bytes):
        self.size += len(data)
        if self.size > self.cfg.max_download_bytes:
            return 0  # abort the transfer: E_WRITE_ERROR
        self.chunks.append(data)
        return None


class Downloads:
    """GETs in flight on one libcurl multi handle: `add(tag, url, cfg)`, then `poll()` until empty.

    Each GET follows up to MAX_REDIRECTS redirects (http/https only) under one deadline per attempt
    (`cfg.timeout_s`: connect, redirects and body), is retried `cfg.retries` times with backoff on
    5xx, 408, 429, timeouts and connection errors (other 4xx and bad URLs fail at once), and stops
    at the body cap. At most `in_flight` run at once; the rest wait in order.
    Memory: O(in_flight) transfers, plus the finished bodies until poll() hands them over.
    """

    def __init__(self, in_flight: int = 16):
        self.in_flight = in_flight
        self.multi = pycurl.CurlMulti()
        self.idle: list[pycurl.Curl] = []
        self.running: dict[pycurl.Curl, _Job] = {}
        self.waiting: deque[_Job] = deque()
        self.backoff: list[tuple[float, int, _Job]] = []  # heap of (due, seq, job) between attempts
        self.seq = 0

    def __bool__(self) -> bool:
        return bool(self.running or self.waiting or self.backoff)

    def add(self, tag, url: str, cfg: ImageConfig) -> None:
        self.waiting.append(_Job(tag, url, cfg))

    def poll(self, timeout: float = 0.0) -> list[tuple[object, bytes | SkipSample]]:
        """Advance every transfer, waiting up to `timeout` s for one to make progress; returns the
        finished GETs as (tag, body), or (tag, SkipSample) once a GET has failed for good."""
        self._start()
        if timeout > 0:
            wait = self._wait_s(timeout)
            if self.running:
                self.multi.select(wait)  # returns as soon as a socket is ready
            elif wait > 0:
                time.sleep(wait)  # only retries waiting out their backoff
        self._perform()
        done: list[tuple[object, bytes | SkipSample]] = []
        while True:
            queued, ok, failed = self.multi.info_read()
            for c in ok:
                self._finish(c, None, done)
            for c, code, message in failed:
                self._finish(c, (code, message), done)
            if not queued:
                break
        if done and self._start():
            self._perform()  # send the new requests now, not at the next poll
        return done

    def cancel(self) -> None:
        """Drop every transfer (a consumer that stopped early); the connections stay cached."""
        for c in self.running:
            self.multi.remove_handle(c)
            self.idle.append(c)
        self.running.clear()
        self.waiting.clear()
        self.backoff.clear()

    def _perform(self) -> None:
        while self.multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass

    def _wait_s(self, timeout: float) -> float:
        ms = self.multi.timeout()  # when libcurl next needs a call (its own timers), -1: none
        wait = timeout if ms < 0 else min(timeout, ms / 1000)
        if self.backoff:
            wait = min(wait, max(0.0, self.backoff[0][0] - time.monotonic()))
        return wait

    def _next_job(self, now: float) -> _Job | None:
        """A retry whose backoff is over first, else the next new GET, else None."""
        if self.backoff and self.backoff[0][0] <= now:
            return heapq.heappop(self.backoff)[2]
        return self.waiting.popleft() if self.waiting else None

    def _start(self) -> bool:
        started = False
        now = time.monotonic()
        while len(self.running) < self.in_flight and (job := self._next_job(now)) is not None:
            c = self.idle.pop() if self.idle else _new_handle()
            timeout_ms = max(1, int(job.cfg.timeout_s * 1000))
            c.setopt(pycurl.URL, job.url)
            c.setopt(pycurl.WRITEFUNCTION, job.write)
            c.setopt(pycurl.TIMEOUT_MS, timeout_ms)  # the whole attempt: connect, redirects, body
            c.setopt(pycurl.CONNECTTIMEOUT_MS, timeout_ms)
            c.setopt(pycurl.MAXFILESIZE_LARGE, job.cfg.max_download_bytes)
            job.chunks, job.size = [], 0
            self.running[c] = job
            self.multi.add_handle(c)
            started = True
        return started

    def _finish(self, c: pycurl.Curl, error: tuple[int, str] | None, done: list) -> None:
        job = self.running.pop(c)
        self.multi.remove_handle(c)
        try:
            done.append((job.tag, _body(c, job, error)))
        except SkipSample as e:
            done.append((job.tag, e))
        except _RetryableError as e:
            job.attempt += 1
            job.last = str(e)
            if job.attempt > job.cfg.retries:
                done.append((job.tag, SkipSample("download_failed",
                                                 f"{job.url}: {job.last} (after {job.attempt} attempts)")))
            else:
                due = time.monotonic() + min(0.05 * 2 ** (job.attempt - 1), 1.0)
                heapq.heappush(self.backoff, (due, self.seq, job))
                self.seq += 1
        finally:
            job.chunks = []
            self.idle.append(c)


def _new_handle() -> pycurl.Curl:
    c = pycurl.Curl()
    c.setopt(pycurl.NOSIGNAL, 1)  # no SIGALRM for DNS timeouts: threads may each run a multi handle
    c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
    c.setopt(pycurl.FOLLOWLOCATION, 1)
    c.setopt(pycurl.MAXREDIRS, MAX_REDIRECTS)
    c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
    c.setopt(pycurl.USERAGENT, "maws-data")
    c.setopt(pycurl.HTTPHEADER, ["Accept-Encoding: identity"])
    c.setopt(pycurl.BUFFERSIZE, 256 * 1024)  # one write callback for most images
    c.setopt(pycurl.CAINFO, certifi.where())
    return c


def _body(c: pycurl.Curl, job: _Job, error: tuple[int, str] | None) -> bytes:
    """The finished attempt's body; raises SkipSample (no use retrying) or _RetryableError."""
    if error is not None:
        code, message = error
        if code in _CURL_FINAL:
            raise SkipSample("download_failed", f"{job.url}: {_CURL_FINAL[code]} ({message})")
        if code in _CURL_TOO_LARGE:
            raise SkipSample("too_large", f"{job.url}: body over cap {job.cfg.max_download_bytes} bytes ({message})")
        raise _RetryableError(f"curl error {code}: {message}")
    status = c.getinfo(pycurl.RESPONSE_CODE)
    if status >= 500 or status in RETRYABLE_4XX:
        raise _RetryableError(f"HTTP {status}")
    if status in REDIRECT_STATUSES:  # followed unless it had no Location
        raise SkipSample("download_failed", f"{job.url}: HTTP {status} without a Location")
    if status != 200:
        raise SkipSample("download_failed", f"{job.url}: HTTP {status}")
    return b"".join(job.chunks)


def _downloads(name: str) -> Downloads:
    """This thread's Downloads for `name` ("single" for download(), "batch" for _loaded)."""
    d = getattr(_local, name, None)
    if d is None:
        d = Downloads()
        setattr(_local, name, d)
    return d


def download(url: str, cfg: ImageConfig) -> bytes:
    """GET `url` (see Downloads); raises SkipSample."""
    d = _downloads("single")
    d.add(None, url, cfg)
    try:
        while True:
            for _, body in d.poll(timeout=1.0):
                if isinstance(body, SkipSample):
                    raise body
                return body
    finally:
        d.cancel()


def _loaded(refs: Sequence[tuple[str | bytes | None, str]], cfg: ImageConfig, in_flight: int
            ) -> Iterator[tuple[int, bytes | SkipSample]]:
    """(position, bytes or SkipSample) for every (ref, base_dir), in the order they become ready:
    http(s) on this thread's multi handle, up to `in_flight` at once; s3:// objects on a pool of
    `in_flight` threads (fsspec blocks); local files and inline bytes read here, whenever no
    download is ready. The caller works between two items, and the downloads go on meanwhile."""
    http = _downloads("batch")
    http.cancel()  # a batch abandoned without being closed must not hand its rows to this one
    http.in_flight = max(1, in_flight)
    here: deque[int] = deque()
    s3: list[int] = []
    for i, (ref, base_dir) in enumerate(refs):
        kind, where = _route(ref, base_dir)
        if kind == "http":
            http.add(i, where, cfg)
        else:
            (s3 if kind == "s3" else here).append(i)

    def load(i: int) -> bytes | SkipSample:
        return _load_or_skip(refs[i], cfg)

    ready: deque[tuple[int, bytes | SkipSample]] = deque()

    def reap(timeout: float = 0.0) -> None:
        ready.extend((i, _checked_or_skip(body, refs[i][0], cfg)) for i, body in http.poll(timeout))

    objects = deque((g, _pool(in_flight).submit(lambda g: [load(i) for i in g], g)) for g in _groups(s3))
    try:
        while ready or http or here or objects:
            # A poll costs a non-blocking read per transfer in flight: with that many images ready
            # to decode, skip it (the responses wait in the socket buffers meanwhile).
            if len(ready) < http.in_flight:
                reap()
            while objects and objects[0][1].done():
                group, future = objects.popleft()
                ready.extend(zip(group, future.result()))
            if ready:
                yield ready.popleft()
            elif here:
                i = here.popleft()
                yield i, load(i)
            elif http:
                reap(timeout=0.05)
            elif objects:
                wait([objects[0][1]], timeout=0.05)
    finally:
        http.cancel()


def _load_or_skip(item: tuple[str | bytes | None, str], cfg: ImageConfig) -> bytes | SkipSample:
    try:
        return load_image_bytes(item[0], base_dir=item[1], cfg=cfg)
    except SkipSample as e:
        return e


def _checked_or_skip(body: bytes | SkipSample, ref, cfg: ImageConfig) -> bytes | SkipSample:
    if isinstance(body, SkipSample):
        return body
    try:
        return _checked(body, ref, cfg)
    except SkipSample as e:
        return e


def load_many(refs: Sequence[tuple[str | bytes | None, str]], cfg: ImageConfig, *, threads: int = 16
              ) -> list[bytes | SkipSample]:
    """load_image_bytes for many (ref, base_dir) pairs, results in input order: `threads` downloads
    (or s3 reads) in flight at once (see _loaded)."""
    results: list = [None] * len(refs)
    for i, data in _loaded(refs, cfg, threads):
        results[i] = data
    return results


def load_and_process_many(refs: Sequence[tuple[str | bytes | None, str]], cfg: ImageConfig, *, threads: int = 16,
                          hashes: bool = False, pipelined: bool = False) -> list[tuple | SkipSample]:
    """load_image_bytes + process_image (Pillow) per (ref, base_dir), in input order.

    By default one pool of `threads` threads, each doing one row end to end. `pipelined`: `threads`
    loads in flight (see _loaded), decode/resize/encode on the calling thread as the loads arrive,
    with no other thread: more than one decoding thread per core only contends for the GIL
    (Pillow-SIMD's JPEG encoder holds it) and the caches (docs/sources_images.md). Same results
    either way.
    """
    def process(data):
        if isinstance(data, SkipSample):
            return data
        try:
            return process_image(data, cfg, hashes=hashes)
        except SkipSample as e:
            return e

    if pipelined:
        results: list = [None] * len(refs)
        for i, data in _loaded(refs, cfg, threads):
            results[i] = process(data)
        return results

    return _map_threads(lambda item: process(_load_or_skip(item, cfg)), refs, threads)


_pools: dict[int, ThreadPoolExecutor] = {}
ROWS_PER_SUBMIT = 8  # rows per thread-pool task: a future per row costs more than a missing file's stat


def _pool(threads: int) -> ThreadPoolExecutor:
    """A per-process pool of `threads` threads, reused by every shard."""
    pool = _pools.get(threads)
    if pool is None:
        pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="maws-images")
    return pool


def _groups(items: Sequence) -> list:
    return [items[i:i + ROWS_PER_SUBMIT] for i in range(0, len(items), ROWS_PER_SUBMIT)]


def _map_threads(fn, items: Sequence, threads: int) -> list:
    """[fn(x) for x in items] on a per-process pool of `threads` threads, in input order; rows go in
    small groups, so a slow download holds up only its own group."""
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    return [r for group in _pool(threads).map(lambda g: [fn(x) for x in g], _groups(items)) for r in group]


# ---------------------------------------------------------------------------------------------
# Decoding + resizing + encoding with Pillow-SIMD


def target_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """Output (w, h): shorter side image_size, aspect kept, never upscaled."""
    short = min(width, height)
    if short <= image_size:
        return width, height
    scale = image_size / short
    if width <= height:
        return image_size, max(1, round(height * scale))
    return max(1, round(width * scale)), image_size


def _open(data: bytes, cfg: ImageConfig) -> Image.Image:
    """Identify the image and check its size before any pixel is decoded."""
    if not data:
        raise SkipSample("empty", "zero bytes")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SkipSample("too_large", str(e)) from None
    except UnidentifiedImageError:
        if data.startswith(IMAGE_MAGIC) or data[8:12] == b"WEBP":
            raise SkipSample("decode_error", f"image signature {data[:4]!r} but unreadable headers") from None
        raise SkipSample("not_image", f"not a recognised image format (starts with {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise SkipSample(_error_reason(e), f"header: {type(e).__name__}: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise SkipSample("decode_error", f"invalid size {w}x{h}")
    if w * h > cfg.max_pixels:
        raise SkipSample("too_large", f"{w}x{h} = {w * h} pixels > cap {cfg.max_pixels}")
    return im


def _error_reason(e: BaseException) -> str:
    text = str(e).lower()
    if isinstance(e, EOFError) or "truncated" in text or "premature end" in text:
        return "truncated"
    return "decode_error"


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block must not lose the image; treat as upright
        return 1


def process_image(data: bytes, cfg: ImageConfig, *, hashes: bool = False) -> tuple:
    """Decode, check, orient, resize (shorter side = image_size) and re-encode; returns (jpeg, w, h),
    or with `hashes` (jpeg, w, h, sha256 hex of `data`, phash of the resized image)."""
    im, out_w, out_h = _decode_resized(data, cfg)
    jpeg = encode_jpeg(im, cfg)
    return (jpeg, out_w, out_h, content_hash(data), phash(im)) if hashes else (jpeg, out_w, out_h)


def _decode_resized(data: bytes, cfg: ImageConfig) -> tuple[Image.Image, int, int]:
    im = _open(data, cfg)
    orientation = _orientation(im)
    w, h = im.size
    upright = (h, w) if orientation in TRANSPOSED_ORIENTATIONS else (w, h)
    out_w, out_h = target_size(*upright, cfg.image_size)
    try:
        if im.format in ("JPEG", "MPO") and (out_w, out_h) != upright:  # MPO: camera JPEGs
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale; draft keeps the size >= the request
            # (in stored orientation), so the exact resize below still downsamples.
            req = (out_h, out_w) if orientation in TRANSPOSED_ORIENTATIONS else (out_w, out_h)
            im.draft("RGB", req)
        im.load()
        im = _to_rgb(im)
        if orientation in EXIF_TRANSPOSE:
            im = im.transpose(EXIF_TRANSPOSE[orientation])
        if im.size != (out_w, out_h):
            im = im.resize((out_w, out_h), Image.Resampling.BICUBIC)
    except SkipSample:
        raise
    except Image.DecompressionBombError as e:
        raise SkipSample("too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise SkipSample(_error_reason(e), f"{type(e).__name__}: {e}") from None
    return im, out_w, out_h


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels onto white: their colour values are arbitrary and often black.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() or 1.0
        return Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def encode_jpeg(im: Image.Image | np.ndarray, cfg: ImageConfig) -> bytes:
    """Deterministic JPEG: fixed quality, 4:2:0, no EXIF/ICC/comment, not progressive."""
    if isinstance(im, np.ndarray):
        im = Image.fromarray(im, "RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=cfg.jpeg_quality, subsampling=2, optimize=False, progressive=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Decoding + resizing with DALI (GPU "mixed", or CPU for tests), encoding with Pillow-SIMD


def choose_decoder(cfg: ImageConfig) -> str:
    """'pil' or 'dali': 'auto' picks DALI when a CUDA device is present and DALI imports."""
    if cfg.decoder != "auto":
        return cfg.decoder
    if cuda_device_count() == 0:
        return "pil"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "pil"
    return "dali"


def cuda_device_count() -> int:
    """CUDA devices, asked of the driver library itself (libcuda's cuInit + cuDeviceGetCount), so
    that a CPU machine's build driver never imports torch to find out (~450 MB of RSS, seconds)."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


DALI_MAX_BATCH = 64
_dali_pipes: dict[tuple[str, int | None], object] = {}


def _dali_pipeline(device: str):
    """One DALI pipeline per (device, device_id) and process; rebuilt after a failed run."""
    from nvidia.dali import fn, pipeline_def, types

    device_id = _device_id(device)
    key = (device, device_id)
    if key not in _dali_pipes:
        @pipeline_def(batch_size=DALI_MAX_BATCH, num_threads=2, device_id=device_id, prefetch_queue_depth=1)
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8)
            rx = fn.external_source(name="rx", dtype=types.FLOAT)
            ry = fn.external_source(name="ry", dtype=types.FLOAT)
            # "mixed": Huffman on CPU, IDCT on the GPU (nvJPEG). Orientation from EXIF is applied.
            img = fn.decoders.image(enc, device="mixed" if device_id is not None else "cpu",
                                    output_type=types.RGB, adjust_orientation=True)
            return fn.resize(img, resize_x=rx, resize_y=ry, antialias=True, interp_type=types.INTERP_CUBIC)

        p = pipe()
        p.build()
        _dali_pipes[key] = p
    return _dali_pipes[key]


def _device_id(device: str) -> int | None:
    if device == "cpu":
        return None
    if device in ("gpu", "cuda"):
        return 0
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    raise ValueError(f"device must be 'cpu', 'gpu', 'cuda' or 'cuda:N', got {device!r}")


def process_images_dali(datas: list[bytes], cfg: ImageConfig, *, device: str, hashes: bool = False
                        ) -> list[tuple | SkipSample]:
    """process_image for a batch, decoded and resized by DALI; one result (or SkipSample) per input.

    Each image's header is parsed by Pillow first (size, orientation, bomb check, format): only
    plain RGB/greyscale JPEGs go to DALI; everything else (PNG with alpha, CMYK, GIF, ...) and
    anything DALI fails on goes through `process_image`, so a bad file costs its own row only.
    """
    results: list[tuple[bytes, int, int] | SkipSample | None] = [None] * len(datas)
    todo: list[tuple[int, np.ndarray, int, int]] = []
    for i, data in enumerate(datas):
        try:
            im = _open(data, cfg)
            # Only complete (EOI-terminated) plain JPEGs go to DALI: nvJPEG may decode a truncated
            # file into a grey-padded image where Pillow says "truncated", and both decoders must
            # keep and skip the same rows.
            if im.format != "JPEG" or im.mode not in ("RGB", "L") or not _ends_with_eoi(data):
                results[i] = process_image(data, cfg, hashes=hashes)
                continue
            w, h = im.size
            if _orientation(im) in TRANSPOSED_ORIENTATIONS:
                w, h = h, w
            todo.append((i, np.frombuffer(data, dtype=np.uint8), *target_size(w, h, cfg.image_size)))
        except SkipSample as e:
            results[i] = e
    for start in range(0, len(todo), DALI_MAX_BATCH):
        _run_dali_batch(todo[start:start + DALI_MAX_BATCH], datas, results, cfg, device, hashes)
    return results  # type: ignore[return-value]


def _ends_with_eoi(data: bytes) -> bool:
    return data.rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9"


def _run_dali_batch(batch, datas, results, cfg: ImageConfig, device: str, hashes: bool) -> None:
    try:
        arrays = _dali_decode(batch, device)
    except Exception:  # noqa: BLE001 - DALI fails the whole batch; redo one by one to find the culprit
        _dali_pipes.pop((device, _device_id(device)), None)
        arrays = []
        for item in batch:
            try:
                arrays.append(_dali_decode([item], device)[0])
            except Exception:  # noqa: BLE001 - Pillow gives the precise skip reason (or succeeds)
                _dali_pipes.pop((device, _device_id(device)), None)
                arrays.append(None)
    for (i, _, w, h), arr in zip(batch, arrays):
        if arr is None or arr.shape[:2] != (h, w):
            try:
                results[i] = process_image(datas[i], cfg, hashes=hashes)
            except SkipSample as e:
                results[i] = e
        else:
            jpeg = encode_jpeg(arr, cfg)
            results[i] = (jpeg, w, h, content_hash(datas[i]), phash(arr)) if hashes else (jpeg, w, h)


def _dali_decode(batch, device: str) -> list[np.ndarray]:
    pipe = _dali_pipeline(device)
    pipe.feed_input("enc", [b for _, b, _, _ in batch])
    pipe.feed_input("rx", [np.array(w, dtype=np.float32) for _, _, w, _ in batch])
    pipe.feed_input("ry", [np.array(h, dtype=np.float32) for _, _, _, h in batch])
    (out,) = pipe.run()
    if hasattr(out, "as_cpu"):
        out = out.as_cpu()
    return [np.array(out[k]) for k in range(len(batch))]
