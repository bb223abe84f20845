"""The shard loader: batches for MAE / WSP / eval from a build's WebDataset shards.

    from maws_data.loader import LoaderConfig, build_loader
    loader = build_loader(LoaderConfig(shards="out/build", task="wsp", batch_size=256), rank=r, world_size=n)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for images, targets in loader:   # images float32 (N,3,S,S) ImageNet-normalised
            ...                          # targets: wsp float32 multi-hot (N, loader.num_classes),
                                         #          mae/eval int64 (N,) first label, -1 unlabeled
        ckpt["loader"] = loader.state_dict()   # JSON; load_state_dict() resumes mid-epoch exactly

How an epoch is planned (the same for both backends, see docs/loader.md):
  * Sample counts and byte offsets come from the builder's per-shard `.idx` (DALI webdataset index)
    cross-checked against the `.json` shard stats; no tar is scanned. Every sample is read by random
    access (one `pread` of its JPEG at the indexed offset), so any rank/worker can read any shard:
    fewer shards than ranks x workers is fine (even one shard).
  * The epoch order is a permutation of all usable samples drawn from (seed, epoch) -- identical on
    every rank -- truncated to a multiple of world_size x batch_size and dealt round-robin to ranks
    (drop_last=True). Every rank gets exactly `batches_per_epoch` full batches; every sample is seen
    at most once per epoch, and the (< world_size x batch_size) left-over samples differ per epoch.
  * drop_last=False (eval): dataset order, every sample exactly once; each rank still yields
    `batches_per_epoch` batches, its last one may be short (even empty, N=0) so collectives never hang.
  * resample="sqrt" (WSP): the epoch is len(pool) draws *with replacement*, sample i with probability
    proportional to 1/sqrt(count of its rarest label) -- see `sqrt_weights`.
  * task="wsp" uses labeled samples only (an unlabeled image has an all-zero target); mae and eval
    use every sample.
  * Augmentation randomness is drawn per sample from (seed, epoch, sample id), so a resumed epoch
    yields the same pixels as an uninterrupted one (on the webdataset backend; DALI's resize is
    deterministic too, the crop boxes and flips come from the same Python code).
  * A sample that cannot be read or decoded is skipped and counted (`loader.skipped`,
    `loader.skipped_samples` with shard and key) and replaced by the first good sample of the same
    batch, so batch sizes and counts stay exact. Samples of a truncated tar beyond its end are
    excluded when the loader is built (counted as "truncated_shard").
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from maws_data.transforms import IMAGENET_MEAN, IMAGENET_STD, Task, batch_geometry, crop_resize, normalize_into
from maws_data.vocab import Vocabulary

STATE_VERSION = 1
# The faster CPU backend, which `backend="auto"` uses without a GPU: measured by tools/bench/loader.py
# (docs/loader.md, 224 px from 256 px shards, 2 workers) webdataset 491/498 img/s vs dali-cpu 447/441
# (eval/mae); webdataset was faster in 7 of 8 runs.
CPU_AUTO_BACKEND: Literal["dali", "webdataset"] = "webdataset"
JPEG_SOI, JPEG_EOI = b"\xff\xd8\xff", b"\xff\xd9"


@dataclass(frozen=True)
class LoaderConfig:
    shards: str | tuple[str, ...]   # build dir (manifest.json + vocabulary.tsv), a shards/ dir, a glob, or tars
    task: Task
    batch_size: int                 # per rank
    image_size: int = 224
    backend: Literal["auto", "dali", "webdataset"] = "auto"
    num_workers: int = 2            # webdataset: DataLoader worker processes; dali: reader threads
    seed: int = 0
    resample: Literal["none", "sqrt"] = "none"   # WSP class balancing (by the rarest label)
    drop_last: bool = True          # False: every sample exactly once, last batch short (eval)
    shuffle: bool | None = None     # None: shuffle for mae/wsp, dataset order for eval
    crop_scale: tuple[float, float] | None = None  # None: the recipe's (mae 0.2-1, wsp 0.08-1)
    dali_threads: int = 4           # DALI decode threads per pipeline
    dali_device: Literal["auto", "gpu", "cpu"] = "auto"  # auto: "mixed" nvJPEG when CUDA is available
    prefetch_batches: int = 2       # per worker (DataLoader prefetch_factor) / DALI queue depth

    def __post_init__(self):
        if self.task not in ("mae", "wsp", "eval"):
            raise ValueError(f"task must be mae, wsp or eval, got {self.task!r}")
        if self.batch_size < 1 or self.image_size < 1:
            raise ValueError(f"batch_size and image_size must be >= 1, got {self.batch_size}, {self.image_size}")
        if self.resample not in ("none", "sqrt"):
            raise ValueError(f"resample must be 'none' or 'sqrt', got {self.resample!r}")
        if self.resample == "sqrt" and self.task != "wsp":
            raise ValueError("resample='sqrt' balances WSP classes; it needs task='wsp'")

    @property
    def shuffled(self) -> bool:
        return self.task != "eval" if self.shuffle is None else self.shuffle


# ---------------------------------------------------------------------------------------------
# The sample table: where every sample's bytes are, and its labels


@dataclass
class SampleTable:
    """All usable samples of the shards, in shard order; global sample id = row."""
    shard_names: list[str]
    tar_paths: list[str]
    shard: np.ndarray          # int32 (n,) shard index
    jpg_off: np.ndarray        # int64 (n,) byte offset of KEY.jpg data in its tar
    jpg_size: np.ndarray       # int64 (n,)
    size: np.ndarray           # int64 (n, 2) stored image width, height (from KEY.json)
    keys: list[str]
    labels: list[list[int]]    # label indices (vocabulary order) from KEY.json
    num_classes: int
    excluded: list[dict] = field(default_factory=list)  # samples dropped at build time, with reason
    fingerprint: str = ""      # of the shards' names and byte sizes and the vocabulary: resume checks it

    def __len__(self) -> int:
        return len(self.keys)

    def first_label(self, gid: int) -> int:
        return self.labels[gid][0] if self.labels[gid] else -1


def resolve_shards(spec: str | Sequence[str]) -> tuple[list[Path], Path | None]:
    """Shard tars (in order) and the build dir holding vocabulary.tsv, if any."""
    if not isinstance(spec, str):
        tars = [Path(s) for s in spec]
    else:
        p = Path(spec)
        if p.is_dir() and (p / "shards").is_dir():
            manifest = p / "manifest.json"
            if not manifest.exists():
                raise FileNotFoundError(f"{manifest} is missing: the build in {p} is incomplete "
                                        "(the builder writes manifest.json last)")
            names = [s["name"] for s in json.loads(manifest.read_text())["shards"]]
            # names are relative to the build dir ("shards/shard-000000.tar"); bare names live in shards/
            tars = [p / n if "/" in n else p / "shards" / n for n in names]
        elif p.is_dir():
            tars = sorted(p.glob("*.tar"))
        else:
            tars = sorted(Path(t) for t in glob.glob(spec))
    if not tars:
        raise FileNotFoundError(f"no shard tars found for {spec!r}")
    for t in tars:
        if not t.exists():
            raise FileNotFoundError(f"shard {t} listed but missing")
    build = next((d for d in (tars[0].parent.parent, tars[0].parent) if (d / "vocabulary.tsv").exists()), None)
    return tars, build


def read_dali_index(idx_path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Parse a DALI webdataset index (v1.2): [(key, {ext: (data_offset, size)})] in tar order."""
    lines = idx_path.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1."):
        raise ValueError(f"{idx_path}: not a DALI webdataset index (first line {lines[:1]})")
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if len(parts) % 4:
            raise ValueError(f"{idx_path}:{lineno}: expected groups of 'ext offset size name', got {line!r}")
        members = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}
        key = parts[3].split(".", 1)[0]
        samples.append((key, members))
    if len(samples) != int(head[1]):
        raise ValueError(f"{idx_path}: header says {head[1]} samples, found {len(samples)}")
    return samples


def _read_sample_json(tar: str, members: list[tuple[int, int]], threads: int = 8) -> list[tuple | str]:
    """KEY.json of each sample -> (labels, width, height), or a reason string when unreadable."""
    fd = os.open(tar, os.O_RDONLY)

    def one(m: tuple[int, int]) -> tuple | str:
        data = os.pread(fd, m[1], m[0])
        if len(data) != m[1]:
            return "truncated_shard"
        try:
            meta = json.loads(data)
            return [int(x) for x in meta["labels"]], int(meta["width"]), int(meta["height"])
        except (ValueError, KeyError, TypeError):
            return "bad_json"

    try:
        with ThreadPoolExecutor(threads) as ex:
            return list(ex.map(one, members))
    finally:
        os.close(fd)


def load_table(spec: str | Sequence[str]) -> SampleTable:
    """Index every shard (from its .idx and .json stats) and read every sample's labels."""
    tars, build = resolve_shards(spec)
    num_classes = len(Vocabulary.load(build)) if build else 0
    cols: dict[str, list] = {"shard": [], "off": [], "size": [], "keys": [], "labels": [], "wh": []}
    excluded: list[dict] = []
    # A rebuild with other images or another vocabulary keeps the shard names and often the sample
    # counts; the tar sizes and the vocabulary text tell it apart (cheap: no tar is read for it).
    digest = hashlib.sha256()
    if build and (build / "vocabulary.tsv").exists():
        digest.update((build / "vocabulary.tsv").read_bytes())
    for si, tar in enumerate(tars):
        digest.update(f"{tar.name}\t{tar.stat().st_size}\n".encode())
        idx_path, stats_path = tar.with_suffix(".idx"), tar.with_suffix(".json")
        if not idx_path.exists():
            raise FileNotFoundError(f"{idx_path} missing: every shard needs its DALI index beside it")
        samples = read_dali_index(idx_path)
        if stats_path.exists():
            expected = json.loads(stats_path.read_text())["samples"]
            if expected != len(samples):
                raise ValueError(f"{tar.name}: stats {stats_path.name} say {expected} samples, index has {len(samples)}")
        tar_bytes = tar.stat().st_size
        ok = []
        for key, m in samples:
            if "jpg" not in m or "json" not in m:
                excluded.append({"shard": tar.name, "key": key, "reason": "missing_member"})
            elif max(o + s for o, s in m.values()) > tar_bytes:
                excluded.append({"shard": tar.name, "key": key, "reason": "truncated_shard"})
            else:
                ok.append((key, m))
        metas = _read_sample_json(str(tar), [m["json"] for _, m in ok])
        for (key, m), meta in zip(ok, metas):
            if isinstance(meta, str):
                excluded.append({"shard": tar.name, "key": key, "reason": meta})
                continue
            lab, width, height = meta
            if any(not 0 <= c < num_classes for c in lab) and num_classes:
                excluded.append({"shard": tar.name, "key": key, "reason": "label_out_of_range"})
                continue
            cols["shard"].append(si)
            cols["off"].append(m["jpg"][0])
            cols["size"].append(m["jpg"][1])
            cols["keys"].append(key)
            cols["labels"].append(lab)
            cols["wh"].append((width, height))
    return SampleTable(shard_names=[t.name for t in tars], tar_paths=[str(t) for t in tars],
                       shard=np.asarray(cols["shard"], np.int32), jpg_off=np.asarray(cols["off"], np.int64),
                       jpg_size=np.asarray(cols["size"], np.int64),
                       size=np.asarray(cols["wh"], np.int64).reshape(-1, 2), keys=cols["keys"], labels=cols["labels"],
                       num_classes=num_classes, excluded=excluded, fingerprint=digest.hexdigest()[:16])


# ---------------------------------------------------------------------------------------------
# Epoch planning (pure functions of counts, seed, epoch, rank)


def sqrt_weights(labels: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """Sampling probability per sample ~ 1/sqrt(n(rarest label)), normalised to sum 1.

    Rarest label: a sample carrying a rare class is up-weighted even if it also carries a common
    one (the rare class is the one balancing is for). For single-label data a class with count n
    is then drawn n/sqrt(n) = sqrt(n) times in expectation: the ratio between the most and the
    least frequent class shrinks from r to sqrt(r).
    """
    counts = np.bincount(np.fromiter((c for lab in labels for c in lab), np.int64), minlength=num_classes)
    rarest = np.array([counts[list(lab)].min() for lab in labels], np.float64)
    w = 1.0 / np.sqrt(rarest)
    return w / w.sum()


def epoch_order(pool: np.ndarray, *, seed: int, epoch: int, shuffle: bool,
                weights: np.ndarray | None = None) -> np.ndarray:
    """The global sample order of one epoch, identical on every rank."""
    rng = np.random.default_rng([seed, epoch])
    if weights is not None:
        return rng.choice(pool, size=len(pool), replace=True, p=weights)
    return rng.permutation(pool) if shuffle else pool


def batches_per_epoch(n: int, *, world_size: int, batch_size: int, drop_last: bool) -> int:
    if drop_last:
        return n // (world_size * batch_size)
    return math.ceil(math.ceil(n / world_size) / batch_size)


def rank_batches(order: np.ndarray, *, rank: int, world_size: int, batch_size: int,
                 drop_last: bool) -> list[np.ndarray]:
    """Deal the epoch order to ranks: rank r takes order[r::world_size] of the kept prefix."""
    nb = batches_per_epoch(len(order), world_size=world_size, batch_size=batch_size, drop_last=drop_last)
    if drop_last:
        mine = order[: nb * world_size * batch_size][rank::world_size]
    else:
        mine = order[rank::world_size]
    out = [mine[i * batch_size:(i + 1) * batch_size] for i in range(nb)]
    assert len(out) == nb
    return out


# ---------------------------------------------------------------------------------------------
# Reading and decoding one sample (shared by both backends)


class SampleReader:
    """Random access to JPEG bytes by global sample id; file handles opened lazily per process."""

    def __init__(self, table: SampleTable):
        self.table = table
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __getstate__(self):
        return {"table": self.table}

    def __setstate__(self, state):
        self.__init__(state["table"])

    def jpeg(self, gid: int) -> bytes:
        """The sample's JPEG bytes; raises SampleError with a reason when they are unusable."""
        if self._pid != os.getpid():  # forked: descriptors are shared with the parent, reopen
            self._fds, self._pid = {}, os.getpid()
        s = int(self.table.shard[gid])
        if s not in self._fds:
            self._fds[s] = os.open(self.table.tar_paths[s], os.O_RDONLY)
        size = int(self.table.jpg_size[gid])
        data = os.pread(self._fds[s], size, int(self.table.jpg_off[gid]))
        if len(data) != size:
            raise SampleError("truncated_shard", f"read {len(data)} of {size} bytes")
        if not data.startswith(JPEG_SOI):
            raise SampleError("not_jpeg", f"starts with {data[:4].hex()}")
        if not data.rstrip(b"\0").endswith(JPEG_EOI):
            raise SampleError("truncated_jpeg", "no end-of-image marker")
        return data

    def where(self, gid: int) -> dict:
        return {"shard": self.table.shard_names[int(self.table.shard[gid])], "key": self.table.keys[gid]}


class SampleError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def plan_geometry(cfg: LoaderConfig, table: SampleTable, gids: np.ndarray, epoch: int,
                  sizes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes and flips of one batch (both backends), from the sizes the builder recorded."""
    sizes = table.size[gids] if sizes is None else sizes
    return batch_geometry(sizes[:, 0], sizes[:, 1], gids, task=cfg.task, image_size=cfg.image_size,
                          seed=cfg.seed, epoch=epoch, crop_scale=cfg.crop_scale)


# ---------------------------------------------------------------------------------------------
# The loader


@dataclass
class Batch:
    """What a backend hands to the loader for one planned batch."""
    index: int
    images: torch.Tensor        # float32 (N,3,S,S), normalised (on the GPU for DALI "mixed")
    gids: np.ndarray            # sample ids actually in the batch (bad ones replaced)
    skipped: list[dict]         # {"shard", "key", "reason", "detail"} for each bad sample
    slot: tuple[int, int] | None = None  # (worker, buffer) of a reused output buffer, freed when dropped


class ShardLoader:
    """One rank's view of the shards; iterate it once per epoch (see module docstring)."""

    def __init__(self, cfg: LoaderConfig, table: SampleTable, *, rank: int, world_size: int, backend: str):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.cfg, self.table, self.rank, self.world_size, self.backend = cfg, table, rank, world_size, backend
        self.num_classes = table.num_classes
        if cfg.task == "wsp" and self.num_classes == 0:
            raise ValueError(f"task wsp needs the build's vocabulary.tsv next to the shards ({cfg.shards!r})")
        if cfg.task == "wsp":
            self.pool = np.array([i for i, lab in enumerate(table.labels) if lab], np.int64)
        else:
            self.pool = np.arange(len(table), dtype=np.int64)
        self.weights = (sqrt_weights([table.labels[i] for i in self.pool], self.num_classes)
                        if cfg.resample == "sqrt" else None)
        self.batches_per_epoch = batches_per_epoch(len(self.pool), world_size=world_size,
                                                   batch_size=cfg.batch_size, drop_last=cfg.drop_last)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self.pool)} usable samples for task {cfg.task}: fewer than world_size "
                             f"{world_size} x batch_size {cfg.batch_size}, so an epoch would have no batch")
        self.epoch = 0
        self.position = 0          # batches of `epoch` already yielded to the caller
        self.skipped: Counter[str] = Counter(e["reason"] for e in table.excluded)
        self.skipped_samples: list[dict] = list(table.excluded)
        self.last_batch_keys: list[str] = []
        self._reader = SampleReader(table)
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

    def plan(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of sample ids for `epoch` (before bad-sample replacement)."""
        order = epoch_order(self.pool, seed=self.cfg.seed, epoch=epoch, shuffle=self.cfg.shuffled,
                            weights=self.weights)
        return rank_batches(order, rank=self.rank, world_size=self.world_size, batch_size=self.cfg.batch_size,
                            drop_last=self.cfg.drop_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.position >= self.batches_per_epoch:  # iterating a finished epoch again replays it
            self.position = 0
        plan = self.plan(self.epoch)
        for batch in self._batches(plan, self.position):
            assert batch.index == self.position, f"batch {batch.index} arrived, expected {self.position}"
            for s in batch.skipped:
                self.skipped[s["reason"]] += 1
                self.skipped_samples.append(s)
            self.last_batch_keys = [self.table.keys[g] for g in batch.gids]
            images = batch.images
            if batch.slot is not None:
                images = self._caller_view(batch)
            self.position += 1
            yield images, self.targets(batch.gids)
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

    def targets(self, gids: np.ndarray) -> torch.Tensor:
        if self.cfg.task == "wsp":
            t = torch.zeros(len(gids), self.num_classes, dtype=torch.float32)
            for row, g in enumerate(gids):
                t[row, self.table.labels[g]] = 1.0
            return t
        return torch.tensor([self.table.first_label(g) for g in gids], dtype=torch.int64)

    def _batches(self, plan: list[np.ndarray], start: int) -> Iterator[Batch]:
        if self.backend == "dali":
            if self._dali is None:
                from maws_data.dali import DaliBatches
                self._dali = DaliBatches(self.cfg, self._reader, self.plan)
            yield from self._dali.batches(self.epoch, start=start)
            return
        if self.cfg.num_workers == 0:
            if self._pool is None:
                self._pool = BufferPool((self.cfg.batch_size, 3, self.cfg.image_size, self.cfg.image_size), 3)
            yield from _PillowBatches(self.cfg, self._reader, plan, start=start, epoch=self.epoch, pool=self._pool)
            return
        # Per worker, prefetch + 2 output buffers are reused (see _PillowBatches.output): the queued
        # batches, the one the caller holds and one being released.
        self._slots = torch.zeros(self.cfg.num_workers, self.cfg.prefetch_batches + 2, dtype=torch.uint8)
        self._slots.share_memory_()
        self._mapped = {}  # (worker, buffer) -> this process's tensor over it (see _caller_view)
        ds = _PillowBatches(self.cfg, self._reader, plan, start=start, epoch=self.epoch, slots=self._slots)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                         prefetch_factor=self.cfg.prefetch_batches, persistent_workers=False)
        try:
            yield from dl
        finally:  # the workers are gone: unmap their buffers (a batch the caller kept holds its own mapping)
            self._mapped = {}

    def state_dict(self) -> dict:
        epoch, position = self.epoch, self.position
        if position >= self.batches_per_epoch:  # a finished epoch resumes at the start of the next
            epoch, position = epoch + 1, 0
        return {"version": STATE_VERSION, "epoch": epoch, "batches": position,
                "batches_per_epoch": self.batches_per_epoch, "seed": self.cfg.seed,
                "world_size": self.world_size, "batch_size": self.cfg.batch_size, "task": self.cfg.task,
                "resample": self.cfg.resample, "shuffle": self.cfg.shuffled, "drop_last": self.cfg.drop_last,
                "shards": self.table.shard_names, "samples": len(self.pool),
                "fingerprint": self.table.fingerprint, "skipped": dict(self.skipped)}

    def load_state_dict(self, d: dict) -> None:
        mine = self.state_dict()
        for k in ("version", "seed", "world_size", "batch_size", "task", "resample", "shuffle", "drop_last",
                  "shards", "samples"):
            if d.get(k) != mine[k]:
                raise ValueError(f"loader state does not match this loader: {k} is {d.get(k)!r} in the state, "
                                 f"{mine[k]!r} here (the epoch plan would differ, so resuming would repeat "
                                 "or skip samples)")
        if "fingerprint" in d and d["fingerprint"] != mine["fingerprint"]:  # (states from before it had none)
            raise ValueError(f"loader state is from other shards: same names and sample count, but other tar sizes "
                             f"or another vocabulary.tsv (fingerprint {d['fingerprint']} in the state, "
                             f"{mine['fingerprint']} here): was {self.cfg.shards} rebuilt?")
        if not 0 <= d["batches"] <= self.batches_per_epoch:
            raise ValueError(f"state position {d['batches']} outside [0, {self.batches_per_epoch}]")
        self.epoch, self.position = int(d["epoch"]), int(d["batches"])


class _PillowBatches(torch.utils.data.IterableDataset):
    """The webdataset backend's worker side: worker w of W builds batches start+w, start+w+W, ...

    torch's DataLoader takes items round-robin from workers 0..W-1, so batches come out in plan
    order; a worker with nothing left stops and the others carry on (no hang).
    """

    def __init__(self, cfg: LoaderConfig, reader: SampleReader, plan: list[np.ndarray], *, start: int, epoch: int,
                 slots: torch.Tensor | None = None, pool: BufferPool | None = None):
        super().__init__()
        self.cfg, self.reader, self.plan, self.start, self.epoch = cfg, reader, plan, start, epoch
        self.slots = slots                       # shared (workers, buffers) uint8: 1 = the main process holds it
        self.pool = pool                         # in-process (no workers)
        self._buffers: dict[int, torch.Tensor] = {}

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)  # each worker is one core; torch ops below are small
        for b in range(self.start + w, len(self.plan), nw):
            yield self.make(b)

    def make(self, b: int) -> Batch:
        gids = self.plan[b].copy()
        images, slot = self.output(len(gids))
        out = images.numpy()
        boxes, flips = plan_geometry(self.cfg, self.reader.table, gids, self.epoch)
        good, bad, skipped = [], [], []
        for row, g in enumerate(gids):
            try:
                normalize_into(out[row], self.decode(int(g), boxes[row], bool(flips[row])))
                good.append(row)
            except SampleError as e:
                bad.append(row)
                skipped.append({**self.reader.where(int(g)), "reason": e.reason, "detail": e.detail})
        _replace_bad(out, gids, good, bad, skipped)
        return Batch(b, images, gids, skipped, slot)

    def output(self, n: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """Shared memory for a batch of n images, and its (worker, buffer) slot when it is a reused one.

        Writing into fresh memory costs a page fault per 4 KiB: on the VMs we measured, the worker
        spent 1.5 ms per 224 px image with a fresh batch and 0.9 ms with a reused one. A buffer is
        reused only after the main process has dropped every tensor, view and array of it (its
        storage's finalizer clears the slot), so a caller that keeps batches gets fresh memory and
        never sees a batch overwritten.
        """
        s, info = self.cfg.image_size, torch.utils.data.get_worker_info()
        if info is None and self.pool is not None:
            return self.pool.take(n), None
        if self.slots is not None and info is not None and n == self.cfg.batch_size:
            for k in range(self.slots.shape[1]):
                if self.slots[info.id, k] == 0:
                    if k not in self._buffers:
                        self._buffers[k] = torch.empty(n, 3, s, s).share_memory_()
                    self.slots[info.id, k] = 1
                    return self._buffers[k], (info.id, k)
        images = torch.empty(n, 3, s, s)
        if info is not None:
            images.share_memory_()  # written in place: sending it to the main process copies nothing
        return images, None

    def decode(self, gid: int, box: np.ndarray, flip: bool) -> np.ndarray:
        from PIL import Image

        data = self.reader.jpeg(gid)
        try:
            im = Image.open(io.BytesIO(data))
            if tuple(self.reader.table.size[gid]) != im.size:  # the recorded size is wrong: trust the JPEG
                boxes, flips = plan_geometry(self.cfg, self.reader.table, np.array([gid]), self.epoch,
                                             sizes=np.array([im.size]))
                box, flip = boxes[0], bool(flips[0])
            return crop_resize(im, tuple(box), flip, self.cfg.image_size)
        except (OSError, ValueError, SyntaxError) as e:  # what Pillow raises for broken images
            raise SampleError("decode_error", str(e)) from e


def _replace_bad(images: np.ndarray, gids: np.ndarray, good: list[int], bad: list[int], skipped: list[dict]) -> None:
    """Bad rows take the first good sample of the batch, keeping the batch size exact."""
    if not bad:
        return
    if not good:
        raise RuntimeError(f"every sample of a batch is unreadable ({skipped[:3]} ...): the shards are broken")
    for row in bad:
        images[row] = images[good[0]]
        gids[row] = gids[good[0]]


class BufferPool:
    """Reused float32 batch buffers for batches made in this process (in-process Pillow, DALI on CPU).

    A batch goes out as a torch tensor over one of `count` numpy arrays; when the caller has dropped
    every tensor, view and array of it (the tensor storage's finalizer), the array is free again.
    Fresh memory costs a page fault per 4 KiB on first write, which was a third of the per-image
    cost on the VMs we measured; a caller that keeps batches simply gets fresh memory.
    """

    def __init__(self, shape: tuple[int, ...], count: int):
        self.shape = shape
        self.free = list(range(count))
        self.arrays: dict[int, np.ndarray] = {}

    def take(self, n: int) -> torch.Tensor:
        """A (n, *shape[1:]) float32 tensor: a free reused buffer for a full batch, else fresh memory."""
        if n != self.shape[0] or not self.free:
            return torch.empty(n, *self.shape[1:])
        k = self.free.pop()
        if k not in self.arrays:
            self.arrays[k] = np.empty(self.shape, np.float32)
        batch = torch.from_numpy(self.arrays[k])
        weakref.finalize(batch.untyped_storage(), self.free.append, k)
        return batch


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
    """Index the shards named by `cfg.shards` and return this rank's loader."""
    table = load_table(cfg.shards)
    return ShardLoader(cfg, table, rank=rank, world_size=world_size, backend=choose_backend(cfg.backend))


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LoaderConfig", "ShardLoader", "batches_per_epoch", "build_loader",
           "epoch_order", "load_table", "rank_batches", "sqrt_weights"]
