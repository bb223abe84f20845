"""From a plan's (shard, k) to the rows of the shards' sidecars: what batch b of an epoch holds.

`BatchSource` is what a backend (in the main process or a DataLoader worker) asks for a batch: it
holds the O(#shards) index, builds the epoch's plan (`plan.EpochPlan`) and loads the sidecars of the
shards it touches into a small LRU cache. It turns the plan's k (the k-th sample of a shard's
sequence) into a sidecar row:
  mae, eval   row k (every sample of the shard)
  wsp         the k-th labeled row (an unlabeled image has no target)
  wsp + sqrt  the k-th of the shard's sorted resampled draws (`plan.shard_draws`)

`ahead(epoch, s)` tells the remote reader which bytes of shard s this process reads this epoch (in
the batches it makes: `set_reader`), so that one request can cover many batches' samples without
fetching bytes that other ranks or workers read.

Memory: O(#shards) + cache of ~2 windows of sidecars (2 x window_shards x samples per shard rows),
and of this process's (shard, k) in the last two windows it read ahead in.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from maws_data import sidecar
from maws_data.loader import plan
from maws_data.loader.config import LoaderConfig
from maws_data.loader.index import ShardIndex, read_sidecar


@dataclass
class BatchSamples:
    """The samples of one batch, as arrays (row i = sample i of the batch)."""
    shard: np.ndarray        # int64 shard index
    row: np.ndarray          # int64 row in the shard's sidecar
    gid: np.ndarray          # int64 global id (index.first[shard] + row): augmentation randomness
    offset: np.ndarray       # int64 byte offset of KEY.jpg in the tar
    size: np.ndarray         # int64 its size
    wh: np.ndarray           # int32 (n, 2) stored width, height
    key: np.ndarray          # bytes (n,) KEY
    label_ptr: np.ndarray    # int64 (n+1,) CSR labels of the batch
    labels: np.ndarray       # int32

    def __len__(self) -> int:
        return len(self.shard)

    def keys(self) -> list[str]:
        return [k.decode() for k in self.key]

    def replace(self, rows: list[int], good: int) -> None:
        """Rows `rows` become copies of row `good` (bad samples replaced by a batch-mate)."""
        if not rows:
            return
        lab = [self.labels[self.label_ptr[i]:self.label_ptr[i + 1]] for i in range(len(self))]
        for r in rows:
            for a in (self.shard, self.row, self.gid, self.offset, self.size, self.wh, self.key):
                a[r] = a[good]
            lab[r] = lab[good]
        self.label_ptr = np.concatenate([[0], np.cumsum([len(x) for x in lab])]).astype(np.int64)
        self.labels = np.concatenate(lab).astype(np.int32) if lab else np.zeros(0, np.int32)


@dataclass
class _Shard:
    samples: sidecar.ShardSamples
    rows: np.ndarray          # rows a plan's k indexes (all, labeled, or sorted draws)
    bad: dict[int, str]       # row -> reason found in the sidecar (labels outside the vocabulary)


class BatchSource:
    """Batches of sidecar rows for one rank: `batch(epoch, b)`; pure given the index and the config."""

    def __init__(self, cfg: LoaderConfig, index: ShardIndex, *, rank: int, world_size: int):
        self.cfg, self.index, self.rank, self.world_size = cfg, index, rank, world_size
        self.counts = index.labeled if cfg.task == "wsp" else index.samples
        pool = int(self.counts.sum())
        # an epoch under sqrt resampling is `epoch_samples` draws (default: as many as labeled samples)
        self.epoch_samples = (cfg.epoch_samples or pool) if cfg.resample == "sqrt" else pool
        self.length = plan.epoch_length(self.epoch_samples, world_size=world_size, batch_size=cfg.batch_size,
                                        drop_last=cfg.drop_last)
        self.batches_per_epoch = plan.batches_per_epoch(self.epoch_samples, world_size=world_size,
                                                        batch_size=cfg.batch_size, drop_last=cfg.drop_last)
        self.reader = (1, 0, -1, 0)  # (workers, worker, epoch, start): the batches this process makes
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()  # DALI's prep thread and the main thread share the caches
        self._plans: OrderedDict[int, plan.EpochPlan] = OrderedDict()
        self._shards: OrderedDict[tuple[int, int], _Shard] = OrderedDict()
        self._capacity = 2 * max(1, self.cfg.window_shards) + 16
        self._mine: OrderedDict[tuple[int, int], dict[int, np.ndarray]] = OrderedDict()  # (epoch, window) -> s -> ks
        self._ahead: OrderedDict[tuple[int, int], tuple[np.ndarray, ...]] = OrderedDict()  # (epoch, s) -> ahead()

    def set_reader(self, workers: int, worker: int, epoch: int, start: int) -> None:
        """This process makes batches start+worker, start+worker+workers, ... of `epoch` (and, of any other
        epoch, batches worker, worker+workers, ...)."""
        with self._lock:
            self.reader = (workers, worker, epoch, start)
            self._mine.clear()
            self._ahead.clear()

    def __getstate__(self):  # sent to DataLoader workers: the index, not the caches
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def epoch_plan(self, epoch: int) -> plan.EpochPlan:
        if epoch not in self._plans:
            counts = self.counts
            if self.cfg.resample == "sqrt":
                counts = plan.resample_counts(self.index.sqrt_weight, self.epoch_samples, seed=self.cfg.seed,
                                              epoch=epoch)
            self._plans[epoch] = plan.EpochPlan(counts, seed=self.cfg.seed, epoch=epoch, shuffle=self.cfg.shuffled,
                                                window_shards=self.cfg.window_shards,
                                                global_batch=self.cfg.batch_size * self.world_size,
                                                read_streams=self.cfg.read_streams)
            while len(self._plans) > 2:
                self._plans.popitem(last=False)
        return self._plans[epoch]

    def batch_len(self, b: int) -> int:
        start, stop = plan.batch_span(b, rank=self.rank, world_size=self.world_size, batch_size=self.cfg.batch_size,
                                      length=self.length)
        return stop - start

    def plan_of(self, epoch: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, k) of rank's batch b: no sidecar read."""
        start, stop = plan.batch_span(b, rank=self.rank, world_size=self.world_size, batch_size=self.cfg.batch_size,
                                      length=self.length)
        return self.epoch_plan(epoch).locate(start, stop)

    def shard(self, epoch: int, s: int, m: int) -> _Shard:
        """Shard s's sidecar and the rows its plan indexes this epoch (m = its count in the plan)."""
        key = (epoch if self.cfg.resample == "sqrt" else -1, s)  # only resampled rows change per epoch
        if key in self._shards:
            self._shards.move_to_end(key)
            return self._shards[key]
        samples = read_sidecar(self.index, s)
        n = int(self.index.samples[s])
        bad = {}
        if len(samples.labels) and self.index.num_classes and samples.labels.max() >= self.index.num_classes:
            rows_of = np.repeat(np.arange(len(samples)), np.diff(samples.label_ptr))
            for r in np.unique(rows_of[samples.labels >= self.index.num_classes]):
                bad[int(r)] = "label_out_of_range"
        if self.cfg.task != "wsp":
            rows = np.arange(n, dtype=np.int64)
        else:
            rows = np.flatnonzero(np.diff(samples.label_ptr)[:n] > 0)
            if self.cfg.resample == "sqrt":
                # (a label outside the vocabulary, marked bad above, counts as 1 instead of raising here)
                w = sidecar.sample_weights_csr(samples.label_ptr[:n + 1], samples.labels,
                                               np.append(self.index.class_counts, 1))[rows]
                rows = rows[plan.shard_draws(w, m, seed=self.cfg.seed, epoch=epoch, shard=s)]
        entry = _Shard(samples, rows, bad)
        self._shards[key] = entry
        while len(self._shards) > self._capacity:
            self._shards.popitem(last=False)
        return entry

    def ahead(self, epoch: int, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets, ends) in the tar, sorted, of every sample of shard s this process reads in `epoch`,
        and the sorted offsets of the shard's samples that only other processes read (a block must not
        span them). The same arrays on every call, until evicted."""
        with self._lock:
            if (epoch, s) in self._ahead:
                self._ahead.move_to_end((epoch, s))
                return self._ahead[(epoch, s)]
            p = self.epoch_plan(epoch)
            w = p.window_of(s)
            if (epoch, w) not in self._mine:
                self._mine[(epoch, w)] = self._mine_in(p, epoch, w)
                while len(self._mine) > 2:
                    self._mine.popitem(last=False)
            ks = self._mine[(epoch, w)].get(s, np.zeros(0, np.int64))
            entry = self.shard(epoch, s, int(p.counts[s]))
            rows = np.sort(entry.rows[ks])
            offsets = entry.samples.jpg_offset
            others = offsets[np.setdiff1d(entry.rows, rows)]  # (sorted: offsets grow with the row)
            self._ahead[(epoch, s)] = out = (offsets[rows], offsets[rows] + entry.samples.jpg_size[rows], others)
            while len(self._ahead) > self._capacity:
                self._ahead.popitem(last=False)
            return out

    def _mine_in(self, p: plan.EpochPlan, epoch: int, w: int) -> dict[int, np.ndarray]:
        """shard -> the k's of window w that this process's batches hold."""
        workers, worker, at_epoch, start = self.reader
        first = start if epoch == at_epoch else 0
        shards, ks = p.window(w)
        pos = p.window_start[w] + np.arange(len(shards))
        chunk = pos // self.cfg.batch_size
        b = chunk // self.world_size
        mine = (chunk % self.world_size == self.rank) & (pos < self.length) & (b >= first) & \
            ((b - first) % workers == worker)
        shards, ks = shards[mine], ks[mine]
        order = np.argsort(shards, kind="stable")
        shards, ks = shards[order], ks[order]
        cuts = np.flatnonzero(np.diff(shards)) + 1
        return {int(g[0]): k for g, k in zip(np.split(shards, cuts), np.split(ks, cuts)) if len(g)}

    def batch(self, epoch: int, b: int) -> tuple[BatchSamples, list[tuple[int, str]]]:
        """Batch b of `epoch` on this rank, and the (row, reason) of samples the sidecar marks bad.

        Vectorised per shard (a batch touches up to window_shards shards): no per-sample Python."""
        with self._lock:
            return self._batch(epoch, b)

    def _batch(self, epoch: int, b: int) -> tuple[BatchSamples, list[tuple[int, str]]]:
        shards, ks = self.plan_of(epoch, b)
        n = len(shards)
        out = BatchSamples(shard=shards.astype(np.int64), row=np.zeros(n, np.int64), gid=np.zeros(n, np.int64),
                           offset=np.zeros(n, np.int64), size=np.zeros(n, np.int64), wh=np.zeros((n, 2), np.int32),
                           key=np.zeros(n, "S1"), label_ptr=np.zeros(n + 1, np.int64), labels=np.zeros(0, np.int32))
        counts = self.epoch_plan(epoch).counts
        groups, lens, bad = [], np.zeros(n, np.int64), []
        for s in np.unique(shards):
            at = np.flatnonzero(shards == s)
            entry = self.shard(epoch, int(s), int(counts[s]))
            sm, rows = entry.samples, entry.rows[ks[at]]
            out.row[at], out.offset[at], out.size[at], out.wh[at] = rows, sm.jpg_offset[rows], sm.jpg_size[rows], sm.size[rows]
            lens[at] = sm.label_ptr[rows + 1] - sm.label_ptr[rows]
            groups.append((at, rows, sm))
            if entry.bad:
                bad += [(int(i), entry.bad[int(r)]) for i, r in zip(at, rows) if int(r) in entry.bad]
        out.gid = self.index.first[out.shard] + out.row
        if not n:
            return out, bad
        width = max(sm.key.dtype.itemsize for _, _, sm in groups)
        out.key = np.zeros(n, f"S{width}")
        np.cumsum(lens, out=out.label_ptr[1:])
        out.labels = np.zeros(int(out.label_ptr[-1]), np.int32)
        for at, rows, sm in groups:  # CSR row gather: the labels of `rows` into the batch's label slots
            out.key[at] = sm.key[rows]
            m = lens[at]
            offset = np.arange(int(m.sum())) - np.repeat(np.cumsum(m) - m, m)
            out.labels[np.repeat(out.label_ptr[at], m) + offset] = sm.labels[np.repeat(sm.label_ptr[rows], m) + offset]
        return out, bad

def geometry(cfg: LoaderConfig, wh: np.ndarray, gids: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes and flips of one batch (both backends), from the sizes the builder recorded."""
    from maws_data.transforms import batch_geometry

    return batch_geometry(wh[:, 0], wh[:, 1], gids, task=cfg.task, image_size=cfg.image_size, seed=cfg.seed,
                          epoch=epoch, crop_scale=cfg.crop_scale)
