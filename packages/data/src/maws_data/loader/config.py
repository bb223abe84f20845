"""`LoaderConfig`: what a training or eval loop asks the loader for. Memory: O(1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from maws_data.transforms import Task


@dataclass(frozen=True)
class LoaderConfig:
    shards: str | tuple[str, ...]   # build dir or URL (manifest.json + vocabulary.tsv), a shards/ dir, a glob, or tars
    task: Task
    batch_size: int                 # per rank
    image_size: int = 224
    backend: Literal["auto", "dali", "webdataset"] = "auto"
    num_workers: int = 2            # webdataset: DataLoader worker processes; dali: reader threads
    seed: int = 0
    resample: Literal["none", "sqrt"] = "none"   # WSP class balancing (by the rarest label)
    epoch_samples: int | None = None  # draws per epoch under resample="sqrt"; None: as many as labeled samples
    drop_last: bool = True          # False: every sample exactly once, last batch short (eval)
    shuffle: bool | None = None     # None: shuffle for mae/wsp, dataset order for eval
    window_shards: int = 128        # shuffle window: samples are interleaved across this many shards (plan.py)
    crop_scale: tuple[float, float] | None = None  # None: the recipe's (mae 0.2-1, wsp 0.08-1)
    dali_threads: int = 4           # DALI decode threads per pipeline
    dali_device: Literal["auto", "gpu", "cpu"] = "auto"  # auto: "mixed" nvJPEG when CUDA is available
    prefetch_batches: int = 2       # per worker (DataLoader prefetch_factor) / DALI queue depth
    read_streams: int = 8           # per rank, a power of two: each reads every shard front to back (plan.py);
                                    # worker counts that divide it read remote shards in large blocks
    remote_block_bytes: int = 8 << 20   # remote shards: ranged reads of up to this much (0: one range per batch)
    remote_cache_bytes: int = 256 << 20  # remote shards: block cache per reading process (reader.py; 0: no blocks)

    def __post_init__(self):
        if self.task not in ("mae", "wsp", "eval"):
            raise ValueError(f"task must be mae, wsp or eval, got {self.task!r}")
        if self.batch_size < 1 or self.image_size < 1:
            raise ValueError(f"batch_size and image_size must be >= 1, got {self.batch_size}, {self.image_size}")
        if self.resample not in ("none", "sqrt"):
            raise ValueError(f"resample must be 'none' or 'sqrt', got {self.resample!r}")
        if self.resample == "sqrt" and self.task != "wsp":
            raise ValueError("resample='sqrt' balances WSP classes; it needs task='wsp'")
        if self.epoch_samples is not None and (self.resample != "sqrt" or self.epoch_samples < 1):
            raise ValueError("epoch_samples (>= 1) sets the draws per epoch of resample='sqrt' only")
        if self.window_shards < 1:
            raise ValueError(f"window_shards must be >= 1, got {self.window_shards}")
        if self.read_streams < 1 or self.read_streams & (self.read_streams - 1):
            raise ValueError(f"read_streams must be a power of two, got {self.read_streams}")
        if self.remote_block_bytes < 0 or self.remote_cache_bytes < 0:
            raise ValueError("remote_block_bytes and remote_cache_bytes must be >= 0")

    @property
    def shuffled(self) -> bool:
        return self.task != "eval" if self.shuffle is None else self.shuffle
