"""Reading the JPEG bytes of a batch's samples from local tars or from object storage / HTTP.

Local tars: one `pread` per sample at its sidecar offset (any worker can read any shard; a few hundred
descriptors are kept open, least recently used closed first).

Remote tars (`s3://`, `http(s)://`, through fsspec), in blocks. The plan hands each reader head one
contiguous, rotated stretch of every shard of a window, read front to back batch after batch, and a
rank's DataLoader worker reads adjacent heads: read_streams / world_size contiguous stretches of each
shard when the world size and the worker count divide `read_streams` (plan.py). `BatchSource.ahead`
gives the reader what this process reads of a shard this epoch; those samples are cut into blocks:
the samples that start in the same `block`-aligned cell of the tar, with no sample of another
process and no gap over AHEAD_GAP between them (gaps this process may read through: tar headers,
wsp's unlabeled rows, rows no resampled draw picked). A block is fetched whole, with one ranged GET,
when the first of its samples is needed, and the next batches find theirs in the cache; since
blocks hold only this process's samples, no byte is fetched by two workers or ranks, and the
requests number about (bytes read / block) + 2 per stretch of a shard. A block is dropped when its
last sample has been read, or, least recently used first, when the cache (`cache_bytes`) is full.
The block is remote_block_bytes, or less, so that the blocks in use for each shard of the largest
window fit in the cache (`block_size`). The shards of one batch are fetched in parallel.
remote_block_bytes=0 or remote_cache_bytes=0: one ranged GET per run of nearby samples of a batch
(the reader before blocks, for comparison). A read that fails (dropped connection, timeout, 5xx) is retried with backoff
(`index.RETRIES` attempts; a block is retried whole) before it becomes an error; a missing object
is an error naming it at once.

Memory: O(batch bytes) plus O(open descriptors); remote: the block cache (<= cache_bytes; in use
about window_shards x min(heads x block, stretch + block)) plus the blocks of the batch being read.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from maws_data import storage
from maws_data.loader.config import LoaderConfig
from maws_data.loader.index import ShardIndex, retrying
from maws_data.loader.plan import window_bounds

# (offsets, ends) in the tar, sorted, of the samples of a shard this process reads, and the offsets of
# those that other processes read (BatchSource.ahead)
Ahead = Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]

JPEG_SOI, JPEG_EOI = b"\xff\xd8\xff", b"\xff\xd9"
MAX_OPEN = 512             # local descriptors kept open per process (> the shards of one batch)
RUN_GAP = 1 << 20          # remote: samples closer than this in a tar are fetched in one range
REMOTE_THREADS = 8         # remote: shards of a batch fetched in parallel
AHEAD_GAP = 256 << 10      # remote blocks: a gap this small in what this process reads is fetched too when
                           # no other process reads in it (unlabeled rows for wsp, rows no draw picked)


def block_budget(cfg: LoaderConfig, n_shards: int, processes: int, world_size: int) -> tuple[int, int]:
    """(cache bytes per shard of the largest window, reader heads per process and shard): a process
    reads all of a window's shards at once, each through the heads of its batches (plan.py): its
    rank's slots (read_streams / world_size, at least 1) x its streams (read_streams / gcd with the
    worker count)."""
    window = int(np.diff(window_bounds(n_shards, cfg.window_shards)).max()) if n_shards else 1
    v = cfg.read_streams
    return cfg.remote_cache_bytes // window, max(1, v // world_size) * (v // math.gcd(v, max(1, processes)))


def block_size(cap: int, per_shard: int, streams: int, reads: int) -> int:
    """The block for a shard of which this process reads `reads` bytes this epoch: as large as the
    cache allows for each shard of a window (`per_shard`), up to `cap`. Each of the process's heads
    (`streams`) reads the shard at its own place, so up to `streams` blocks of it are in use at once,
    but never more than what it reads plus one block: min(streams x block, reads + block) <= per_shard."""
    return max(1, min(cap, max(per_shard // streams, per_shard - reads)))


class BlockCache:
    """Remote blocks by (shard, start, end) in the tar; the least recently used is dropped first, and the
    blocks never hold more than `budget` bytes."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.blocks: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()  # the shards of a batch are read on several threads

    def get(self, key: tuple[int, int, int]) -> bytes | None:
        with self._lock:
            if key in self.blocks:
                self.blocks.move_to_end(key)
            return self.blocks.get(key)

    def put(self, key: tuple[int, int, int], data: bytes) -> None:
        with self._lock:
            self._drop(key)
            if len(data) > self.budget:
                return
            while self.used + len(data) > self.budget:
                self.used -= len(self.blocks.popitem(last=False)[1])
            self.blocks[key] = data
            self.used += len(data)

    def drop(self, key: tuple[int, int, int]) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: tuple[int, int, int]) -> None:
        old = self.blocks.pop(key, None)
        if old is not None:
            self.used -= len(old)


def blocks_of(starts: np.ndarray, ends: np.ndarray, others: np.ndarray,
              block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks of a process's samples of one shard (sorted by start): runs of samples that start in the
    same `block`-aligned cell of the tar, with no gap over AHEAD_GAP and no sample of another process
    (`others`, sorted offsets) between them. (block of each sample, block starts, block ends)."""
    if not len(starts):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    reach = np.maximum.accumulate(ends)
    new = np.ones(len(starts), bool)
    foreign = np.searchsorted(others, starts[1:]) != np.searchsorted(others, reach[:-1])
    new[1:] = (starts[1:] // block != starts[:-1] // block) | (starts[1:] - reach[:-1] > AHEAD_GAP) | foreign
    first = np.flatnonzero(new)
    return np.cumsum(new) - 1, starts[first], np.maximum.reduceat(ends, first)


class SampleError(Exception):
    """A sample that cannot be used; `reason` is the counter name (`loader.skipped`)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def check_jpeg(data: bytes, size: int) -> bytes:
    if len(data) != size:
        raise SampleError("truncated_shard", f"read {len(data)} of {size} bytes")
    if not data.startswith(JPEG_SOI):
        raise SampleError("not_jpeg", f"starts with {data[:4].hex()}")
    if not data.rstrip(b"\0").endswith(JPEG_EOI):
        raise SampleError("truncated_jpeg", "no end-of-image marker")
    return data


class ShardFiles:
    """Bytes of samples by (shard, offset, size); handles are opened lazily in the process that reads."""

    def __init__(self, index: ShardIndex, threads: int = 1, *, block: int = 0, cache_bytes: int = 0,
                 per_shard: int = 0, streams: int = 1):
        self.index, self.threads, self.block, self.cache_bytes = index, threads, block, cache_bytes
        self.per_shard, self.streams = per_shard, streams  # (block_size)
        self._reset()

    @classmethod
    def for_config(cls, index: ShardIndex, cfg: LoaderConfig, *, threads: int = 1, processes: int,
                   world_size: int) -> ShardFiles:
        """The reader of a rank whose batches are made by `processes` DataLoader workers (1: in-process)."""
        per_shard, streams = block_budget(cfg, len(index), processes, world_size)
        return cls(index, threads, block=cfg.remote_block_bytes, cache_bytes=cfg.remote_cache_bytes,
                   per_shard=per_shard, streams=streams)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._fs = None
        self._pool: ThreadPoolExecutor | None = None
        self.cache = BlockCache(self.cache_bytes)
        # shard -> (its `ahead` starts, block of each sample, block starts, ends, samples left to read per block)
        self._parts: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()
        self._parts_lock = threading.Lock()
        self.requests = self.request_bytes = 0  # remote ranged GETs of this process (tests, diagnostics)

    def __getstate__(self):
        return {k: getattr(self, k) for k in ("index", "threads", "block", "cache_bytes", "per_shard", "streams")}

    def __setstate__(self, state):
        self.__init__(**state)

    def read(self, shard: np.ndarray, offset: np.ndarray, size: np.ndarray,
             ahead: Ahead | None = None) -> list[bytes | SampleError]:
        """Each sample's JPEG bytes (checked: complete, starts and ends like a JPEG) or its SampleError.

        Remote: `ahead` (what this process reads of a shard this epoch) lets one request cover the
        next batches' samples too; without it, or with block 0, one request per run of the batch's
        samples."""
        if self._pid != os.getpid():  # forked (DataLoader worker): descriptors, pools and sockets are the parent's
            self._reset()
        out: list[bytes | SampleError] = [b""] * len(shard)
        if self.index.remote:
            groups = [np.flatnonzero(shard == s) for s in np.unique(shard)]
            pool = self._threads()

            def fetch(r: np.ndarray) -> list[bytes]:
                s = int(shard[r[0]])
                if self.block and self.cache_bytes and ahead is not None:  # (no cache: per-batch ranges)
                    return self._blocks(s, offset[r], size[r], ahead)
                return self._remote(s, offset[r], size[r])

            for rows, datas in zip(groups, pool.map(fetch, groups)):
                for row, d in zip(rows, datas):
                    out[row] = d
        else:
            fds = [self._fd(int(s)) for s in shard]  # opened here, not on the pool's threads

            def pread(rows: np.ndarray) -> None:
                for row in rows:
                    out[row] = os.pread(fds[row], int(size[row]), int(offset[row]))

            if self.threads > 1 and len(shard) > 1:  # (DALI's host side): pread releases the GIL
                list(self._threads().map(pread, np.array_split(np.arange(len(shard)), self.threads)))
            else:
                pread(np.arange(len(shard)))
        for i, d in enumerate(out):
            try:
                out[i] = check_jpeg(d, int(size[i]))
            except SampleError as e:
                out[i] = e
        return out

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(self.threads, REMOTE_THREADS if self.index.remote else 1))
        return self._pool

    def _fd(self, s: int) -> int:
        if s in self._fds:
            self._fds.move_to_end(s)
            return self._fds[s]
        if len(self._fds) >= MAX_OPEN:
            os.close(self._fds.popitem(last=False)[1])
        self._fds[s] = os.open(self.index.tars[s], os.O_RDONLY)
        return self._fds[s]

    def _blocks(self, s: int, offset: np.ndarray, size: np.ndarray, ahead: Ahead) -> list[bytes]:
        """One shard's samples of a batch, each from its block (cached, or fetched now)."""
        path = self._path(s)
        starts, bid, bstart, bend, left = self._partition(s, ahead)
        at = np.minimum(np.searchsorted(starts, offset), max(0, len(starts) - 1))
        fetched: dict[tuple[int, int, int], bytes] = {}  # (also serves this batch when a block is not cached)
        out = []
        for o, n, i in zip(offset.tolist(), size.tolist(), at.tolist()):
            if len(starts) and starts[i] == o:
                k = int(bid[i])
                key = (s, int(bstart[k]), int(bend[k]))
            else:  # not among the samples `ahead` planned for this process: read it alone
                k, key = -1, (s, o, o + n)
            data = fetched.get(key) or self.cache.get(key)
            if data is None:
                data = fetched[key] = self._ranged(path, key[1], key[2])
                if k >= 0:
                    self.cache.put(key, data)
            out.append(data[o - key[1]:o - key[1] + n])
            if k >= 0:
                left[k] -= 1
                if left[k] == 0:  # its last sample: no later batch of this process needs the block
                    self.cache.drop(key)
        return out

    def _partition(self, s: int, ahead: Ahead) -> tuple[np.ndarray, ...]:
        """The blocks of this process's samples of shard s, recomputed when `ahead` changes (an epoch)."""
        starts, ends, others = ahead(s)
        with self._parts_lock:
            part = self._parts.get(s)
            if part is None or part[0] is not starts:
                reads = int(ends.max() - starts.min()) if len(starts) else 0
                block = block_size(self.block, self.per_shard, self.streams, reads)
                bid, bstart, bend = blocks_of(starts, ends, others, block)
                self._parts[s] = part = (starts, bid, bstart, bend, np.bincount(bid, minlength=len(bstart)))
            self._parts.move_to_end(s)
            while len(self._parts) > MAX_OPEN:
                self._parts.popitem(last=False)
        return part

    def _path(self, s: int) -> str:
        if self._fs is None:
            self._fs, _ = storage.filesystem(self.index.tars[0])
        return storage.filesystem(self.index.tars[s])[1]

    def _remote(self, s: int, offset: np.ndarray, size: np.ndarray) -> list[bytes]:
        """One shard's samples: runs of nearby samples, one ranged read each."""
        path = self._path(s)
        order = np.argsort(offset, kind="stable")
        out: list[bytes] = [b""] * len(offset)
        i = 0
        while i < len(order):
            j, end = i + 1, int(offset[order[i]] + size[order[i]])
            while j < len(order) and offset[order[j]] - end < RUN_GAP:
                end = max(end, int(offset[order[j]] + size[order[j]]))
                j += 1
            start = int(offset[order[i]])
            blob = self._ranged(path, start, end)
            for r in order[i:j]:
                out[r] = blob[offset[r] - start: offset[r] - start + size[r]]
            i = j
        return out

    def _ranged(self, path: str, start: int, end: int) -> bytes:
        self.requests += 1  # (threads: a lost increment only miscounts a diagnostic)
        self.request_bytes += end - start
        try:
            return retrying(lambda: self._fs.cat_file(path, start=start, end=end), f"{path} bytes {start}-{end}")
        except FileNotFoundError:
            raise FileNotFoundError(f"shard {path} listed in the index but missing") from None
