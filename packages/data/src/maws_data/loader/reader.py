"""Reading the JPEG bytes of a batch's samples from local tars or from object storage / HTTP.

Local tars: one `pread` per sample at its sidecar offset (any worker can read any shard; a few hundred
descriptors are kept open, least recently used closed first).

Remote tars (`s3://`, `http(s)://`, through fsspec): the samples of a batch are grouped by shard, and
the samples of one shard that lie close together in its tar (the plan reads each shard front to back,
so a batch's samples of a shard are consecutive) are fetched with one ranged GET per run, several
shards in parallel. A read that fails (dropped connection, timeout, 5xx) is retried with backoff
(`index.RETRIES` attempts) before it becomes an error; a missing object is an error naming it at once.

Memory: O(batch bytes) plus O(open descriptors).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from maws_data import storage
from maws_data.loader.index import ShardIndex, retrying

JPEG_SOI, JPEG_EOI = b"\xff\xd8\xff", b"\xff\xd9"
MAX_OPEN = 512             # local descriptors kept open per process (> the shards of one batch)
RUN_GAP = 1 << 20          # remote: samples closer than this in a tar are fetched in one range
REMOTE_THREADS = 8         # remote: shards of a batch fetched in parallel


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

    def __init__(self, index: ShardIndex, threads: int = 1):
        self.index, self.threads = index, threads
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._fs = None
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self):
        return {"index": self.index, "threads": self.threads}

    def __setstate__(self, state):
        self.__init__(state["index"], state["threads"])

    def read(self, shard: np.ndarray, offset: np.ndarray, size: np.ndarray) -> list[bytes | SampleError]:
        """Each sample's JPEG bytes (checked: complete, starts and ends like a JPEG) or its SampleError."""
        if self._pid != os.getpid():  # forked (DataLoader worker): descriptors, pools and sockets are the parent's
            self._reset()
        out: list[bytes | SampleError] = [b""] * len(shard)
        if self.index.remote:
            groups = [np.flatnonzero(shard == s) for s in np.unique(shard)]
            pool = self._threads()
            for rows, datas in zip(groups, pool.map(lambda r: self._remote(int(shard[r[0]]), offset[r], size[r]), groups)):
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

    def _remote(self, s: int, offset: np.ndarray, size: np.ndarray) -> list[bytes]:
        """One shard's samples: runs of nearby samples, one ranged read each."""
        if self._fs is None:
            self._fs, _ = storage.filesystem(self.index.tars[0])
        path = storage.filesystem(self.index.tars[s])[1]
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
        try:
            return retrying(lambda: self._fs.cat_file(path, start=start, end=end), f"{path} bytes {start}-{end}")
        except FileNotFoundError:
            raise FileNotFoundError(f"shard {path} listed in the index but missing") from None
