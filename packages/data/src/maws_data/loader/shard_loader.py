"""`ShardLoader`: one rank's batches, epoch position and resume state; picks and drives a backend.

Memory: the index (O(#shards)), the main process's BatchSource (plans only: it reads no sidecar
unless it makes batches itself, num_workers=0 or DALI), the bad-sample records.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from maws_data.loader.buffers import Batch, BufferPool
from maws_data.loader.config import LoaderConfig
from maws_data.loader.cpu import PillowBatches
from maws_data.loader.index import ShardIndex, open_index
from maws_data.loader.reader import ShardFiles
from maws_data.loader.samples import BatchSource

# 2: shard-window plans; 3: + reader heads (`read_streams`; a version 2 state is the plan with read_streams=1)
STATE_VERSION = 3
# The faster CPU backend, which `backend="auto"` uses without a GPU: measured by tools/bench/loader.py
# (docs/loader.md): webdataset 1.9-2.35x the ImageFolder baseline, dali-cpu 0.94-1.2x.
CPU_AUTO_BACKEND: Literal["dali", "webdataset"] = "webdataset"


class ShardLoader:
    """One rank's view of the shards; iterate it once per epoch (see maws_data.loader)."""

    def __init__(self, cfg: LoaderConfig, index: ShardIndex, *, rank: int, world_size: int, backend: str):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.cfg, self.index, self.rank, self.world_size, self.backend = cfg, index, rank, world_size, backend
        self.num_classes = index.num_classes
        if cfg.task == "wsp" and self.num_classes == 0:
            raise ValueError(f"task wsp needs the build's vocabulary.tsv next to the shards ({cfg.shards!r})")
        self.source = BatchSource(cfg, index, rank=rank, world_size=world_size)
        self.num_samples = self.source.epoch_samples   # samples (or draws) per epoch, all ranks together
        self.batches_per_epoch = self.source.batches_per_epoch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.num_samples} usable samples for task {cfg.task}: fewer than world_size "
                             f"{world_size} x batch_size {cfg.batch_size}, so an epoch would have no batch")
        self.epoch = 0
        self.position = 0          # batches of `epoch` already yielded to the caller
        self.skipped: Counter[str] = Counter(e["reason"] for e in index.excluded)
        self.skipped_samples: list[dict] = list(index.excluded)
        self.last_batch_keys: list[str] = []
        self._files = ShardFiles.for_config(index, cfg, processes=cfg.num_workers, world_size=world_size)
        self._dali = None
        self._slots: torch.Tensor | None = None  # output buffers of this epoch's DataLoader workers
        self._pool: BufferPool | None = None      # output buffers of the in-process backend
        self.pooled_batches = 0  # batches that came in a worker's reused output buffer
        self._mapped: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; keeps a resumed mid-epoch position when the epoch is the same."""
        if epoch != self.epoch or self.position >= self.batches_per_epoch:
            self.epoch, self.position = epoch, 0

    def plan_keys(self, epoch: int) -> list[list[str]]:
        """This rank's planned sample keys per batch of `epoch` (reads sidecars; for tests and tools)."""
        return [self.source.batch(epoch, b)[0].keys() for b in range(self.batches_per_epoch)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.position >= self.batches_per_epoch:  # iterating a finished epoch again replays it
            self.position = 0
        for batch in self._batches(self.position):
            assert batch.index == self.position, f"batch {batch.index} arrived, expected {self.position}"
            for s in batch.skipped:
                self.skipped[s["reason"]] += 1
                self.skipped_samples.append(s)
            self.last_batch_keys = batch.samples.keys()
            images = batch.images
            if batch.slot is not None:
                images = self._caller_view(batch)
            self.position += 1
            yield images, self.targets(batch)
            del images, batch  # not held while the next batch is made: its buffer is reused if the caller let go
        if self.position != self.batches_per_epoch:  # a short epoch on one rank hangs the others' collectives
            raise RuntimeError(f"{self.backend} backend ended epoch {self.epoch} after {self.position} of "
                               f"{self.batches_per_epoch} batches")

    def _caller_view(self, batch: Batch) -> torch.Tensor:
        """The caller's tensor over a worker's reused buffer. This process keeps its own mapping of the
        buffer (`_mapped`), so the next batch the worker sends in it is mapped again for free (torch
        finds the live storage in its shared-memory cache) instead of page-faulting on first read; the
        caller's tensor is a separate storage over the same memory, whose finalizer tells the worker
        that every view of the batch is gone and the buffer may be written again."""
        self._mapped[batch.slot] = batch.images
        view = torch.from_numpy(batch.images.numpy())
        weakref.finalize(view.untyped_storage(), _free_slot, self._slots, *batch.slot)
        self.pooled_batches += 1
        return view

    def targets(self, batch: Batch) -> torch.Tensor:
        """wsp: float32 multi-hot (N, num_classes); mae/eval: int64 (N,) first label, -1 unlabeled."""
        s = batch.samples
        n_labels = np.diff(s.label_ptr)
        if self.cfg.task == "wsp":
            t = torch.zeros(len(s), self.num_classes, dtype=torch.float32)
            rows = np.repeat(np.arange(len(s)), n_labels)
            ok = s.labels < self.num_classes  # (a label outside the vocabulary is a bad, replaced, sample)
            t[torch.from_numpy(rows[ok]), torch.from_numpy(s.labels[ok].astype(np.int64))] = 1.0
            return t
        first = np.full(len(s), -1, np.int64)
        has = n_labels > 0
        first[has] = s.labels[s.label_ptr[:-1][has]]
        return torch.from_numpy(first)

    def _batches(self, start: int) -> Iterator[Batch]:
        if self.backend == "dali":
            if self._dali is None:
                from maws_data.loader.dali import DaliBatches
                self._dali = DaliBatches(self.cfg, self.source)
            yield from self._dali.batches(self.epoch, start=start)
            return
        if self.cfg.num_workers == 0:
            if self._pool is None:
                self._pool = BufferPool((self.cfg.batch_size, 3, self.cfg.image_size, self.cfg.image_size), 3)
            yield from PillowBatches(self.cfg, self.source, self._files, epoch=self.epoch, start=start, pool=self._pool)
            return
        # Per worker, prefetch + 2 output buffers are reused (see PillowBatches.output): the queued
        # batches, the one the caller holds and one being released.
        self._slots = torch.zeros(self.cfg.num_workers, self.cfg.prefetch_batches + 2, dtype=torch.uint8)
        self._slots.share_memory_()
        self._mapped = {}  # (worker, buffer) -> this process's tensor over it (see _caller_view)
        ds = PillowBatches(self.cfg, self.source, self._files, epoch=self.epoch, start=start, slots=self._slots)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                         prefetch_factor=self.cfg.prefetch_batches, persistent_workers=False)
        try:
            yield from dl
        finally:  # the workers are gone: unmap their buffers (a batch the caller kept holds its own mapping)
            self._mapped = {}

    def state_dict(self) -> dict:
        """A few integers and strings: the epoch, the position in it, and what the plan depends on."""
        epoch, position = self.epoch, self.position
        if position >= self.batches_per_epoch:  # a finished epoch resumes at the start of the next
            epoch, position = epoch + 1, 0
        return {"version": STATE_VERSION, "epoch": epoch, "batches": position,
                "batches_per_epoch": self.batches_per_epoch, "seed": self.cfg.seed,
                "world_size": self.world_size, "batch_size": self.cfg.batch_size, "task": self.cfg.task,
                "resample": self.cfg.resample, "shuffle": self.cfg.shuffled, "drop_last": self.cfg.drop_last,
                "window_shards": self.cfg.window_shards, "read_streams": self.cfg.read_streams,
                "shards": len(self.index), "samples": self.num_samples,
                "fingerprint": self.index.fingerprint, "skipped": dict(self.skipped)}

    def load_state_dict(self, d: dict) -> None:
        if d.get("version") == 2:  # shard windows without reader heads: the same plan as read_streams=1
            d = {**d, "version": STATE_VERSION, "read_streams": 1}
        mine = self.state_dict()
        for k in ("version", "seed", "world_size", "batch_size", "task", "resample", "shuffle", "drop_last",
                  "window_shards", "read_streams", "shards", "samples"):
            if d.get(k) != mine[k]:
                raise ValueError(f"loader state does not match this loader: {k} is {d.get(k)!r} in the state, "
                                 f"{mine[k]!r} here (the epoch plan would differ, so resuming would repeat "
                                 "or skip samples)")
        if d["fingerprint"] != mine["fingerprint"]:
            raise ValueError(f"loader state is from other shards: same shard and sample counts, but other shard "
                             f"names, bytes or another vocabulary.tsv (fingerprint {d['fingerprint']} in the state, "
                             f"{mine['fingerprint']} here): was {self.cfg.shards} rebuilt?")
        if not 0 <= d["batches"] <= self.batches_per_epoch:
            raise ValueError(f"state position {d['batches']} outside [0, {self.batches_per_epoch}]")
        self.epoch, self.position = int(d["epoch"]), int(d["batches"])


def _free_slot(slots: torch.Tensor, worker: int, buffer: int) -> None:
    slots[worker, buffer] = 0


def choose_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    if torch.cuda.is_available():
        try:
            import nvidia.dali  # noqa: F401
            return "dali"
        except ImportError:
            pass
    return CPU_AUTO_BACKEND


def build_loader(cfg: LoaderConfig, *, rank: int = 0, world_size: int = 1) -> ShardLoader:
    """Index the shards named by `cfg.shards` (O(#shards) reads) and return this rank's loader."""
    return ShardLoader(cfg, open_index(cfg.shards), rank=rank, world_size=world_size,
                       backend=choose_backend(cfg.backend))
