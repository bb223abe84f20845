"""What a backend hands the loader per batch (`Batch`), and reused output buffers (`BufferPool`).

Memory: `count` batches of float32 images per pool.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from maws_data.loader.samples import BatchSamples


@dataclass
class Batch:
    """One planned batch, made by a backend."""
    index: int
    images: torch.Tensor        # float32 (N,3,S,S), normalised (on the GPU for DALI "mixed")
    samples: BatchSamples       # the samples actually in the batch (bad ones replaced)
    skipped: list[dict]         # {"shard", "key", "reason", "detail"} for each bad sample
    slot: tuple[int, int] | None = None  # (worker, buffer) of a reused output buffer, freed when dropped


def replace_bad(images: np.ndarray | None, samples: BatchSamples, good: list[int], bad: list[int],
                skipped: list[dict]) -> None:
    """Bad rows take the first good sample of the batch, keeping the batch size exact."""
    if not bad:
        return
    if not good:
        raise RuntimeError(f"every sample of a batch is unreadable ({skipped[:3]} ...): the shards are broken")
    if images is not None:
        for row in bad:
            images[row] = images[good[0]]
    samples.replace(bad, good[0])


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
