"""Epoch plans: which samples batch b of rank r holds, as pure functions of per-shard counts, seed and epoch.

Nothing here reads a file or knows a sample: a plan names samples as (shard, k), "the k-th sample of
that shard's sequence this epoch"; the loader turns k into a sidecar row (all rows for mae/eval, the
labeled rows for wsp, the sorted resampled draws for sqrt resampling).

One epoch, given per-shard counts n_s (identical on every rank):
  1. The shards are permuted from (seed, epoch) (`shard_order`; dataset order without shuffle).
  2. The permuted shards are cut into windows of `window_shards` consecutive shards (at least that
     many, the last ones balanced: `np.array_split`). Inside a window the samples of its shards are
     interleaved uniformly at random: the window's sequence is a random permutation of the multiset
     {s repeated n_s times}, and each shard's samples come in tar order, starting from a random
     rotation per (epoch, shard). So a shard is read front to back (large sequential reads on object
     storage) while any stretch of the sequence mixes all the window's shards.
     Given the global batch G = world_size x batch_size and `read_streams` V (a power of two),
     "front to back" holds per **reader head**: position p is in global batch g = p // G, at place
     p mod G of it; its head is (slot, stream) = ((p mod G) * V // G, g mod V), and a shard's samples
     are handed out head by head, in the order (slot, bit-reversed stream) (`reader_streams`). Each
     head reads one contiguous rotated stretch of every shard, batch after batch. Rank r of R holds
     places [rG/R, (r+1)G/R) of every global batch: the V/R slots r*V/R.. when R divides V; its
     batch b is global batch b, and a DataLoader worker w of W (W dividing V) makes the batches
     b = w mod W: the streams whose low bits are w, adjacent once bit-reversed. So each (rank, worker)
     reads every shard as V/R contiguous stretches (one when R = V), each read by V/W heads. Without
     heads, worker w of W would read every (world_size x W)-th small group of a shard, and no remote
     read could be larger than one group without fetching other processes' bytes. The heads depend
     on G and V only, not on how G is split into ranks, nor on the number of workers: one process
     with batch G and R processes with batch G/R get the same global batches (the trainers' test),
     and the same batches come for any number of workers. V is part of the plan and of the resume
     state.
  3. The concatenated windows are the epoch's global sequence (length N = sum n_s). It is cut into
     chunks of batch_size and chunk c goes to rank c % world_size as its batch c // world_size. With
     drop_last the sequence is first cut to a multiple of world_size x batch_size: every rank gets
     exactly N // (world_size x batch_size) full batches, each sample at most once, none on two ranks;
     the left-over tail differs per epoch (the shard order does). Without drop_last every sample comes
     exactly once; ranks whose last chunk is missing yield an empty batch, so batch counts stay equal.

Shuffle quality (tests/loader/test_plan.py): with window_shards=128, any 1,000 consecutive samples a rank
yields come from >= 64 shards, for builds of >= 128 shards of comparable size.

Memory: O(#shards) per epoch (order, window bounds) plus O(samples of one window) for the window being
read (two int arrays); nothing grows with the size of the build beyond the shard count.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

# Separate random streams for the parts of a plan (numpy SeedSequence entropy words).
_ORDER, _WINDOW, _RESAMPLE, _DRAWS = 1, 2, 3, 4


def shard_order(n_shards: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's shard permutation (int64), dataset order without shuffle."""
    if not shuffle:
        return np.arange(n_shards, dtype=np.int64)
    return np.random.default_rng([seed, epoch, _ORDER]).permutation(n_shards)


def reader_streams(pos: np.ndarray, global_batch: int, read_streams: int) -> np.ndarray:
    """The reader head of each position, as its rank in the order (slot, bit-reversed stream) (above)."""
    v = read_streams
    slot = (pos % global_batch) * v // global_batch
    j = (pos // global_batch) % v
    rev = np.zeros_like(j)
    for i in range(v.bit_length() - 1):  # reverse the low log2(v) bits of j
        rev |= ((j >> i) & 1) << (v.bit_length() - 2 - i)
    return slot * v + rev


def resample_counts(weights: np.ndarray, total: int, *, seed: int, epoch: int) -> np.ndarray:
    """Draws per shard for one resampled epoch: multinomial(total, weights / sum(weights)).

    Drawing `total` samples with replacement, sample i with probability w_i / sum(w), is the same
    distribution as this multinomial over shards (weights = per-shard sums of w_i) followed by
    `shard_draws` inside each shard: the per-shard counts of the global draw are exactly this
    multinomial, and given them, the draws inside a shard are independent and proportional to w_i."""
    w = np.asarray(weights, np.float64)
    if not w.sum() > 0:
        raise ValueError("resampling weights sum to 0: no labeled sample")
    return np.random.default_rng([seed, epoch, _RESAMPLE]).multinomial(total, w / w.sum()).astype(np.int64)


def shard_draws(weights: np.ndarray, m: int, *, seed: int, epoch: int, shard: int) -> np.ndarray:
    """m rows of one shard drawn with replacement proportional to `weights`, sorted (read in tar order)."""
    w = np.asarray(weights, np.float64)
    rng = np.random.default_rng([seed, epoch, shard, _DRAWS])
    return np.sort(rng.choice(len(w), size=m, replace=True, p=w / w.sum()))


def batches_per_epoch(n: int, *, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Batches every rank yields for an epoch of n samples."""
    if drop_last:
        return n // (world_size * batch_size)
    return math.ceil(math.ceil(n / batch_size) / world_size)


def epoch_length(n: int, *, world_size: int, batch_size: int, drop_last: bool) -> int:
    """How much of the epoch's global sequence is dealt (all of it without drop_last)."""
    if drop_last:
        return batches_per_epoch(n, world_size=world_size, batch_size=batch_size, drop_last=True) * world_size * batch_size
    return n


def batch_span(b: int, *, rank: int, world_size: int, batch_size: int, length: int) -> tuple[int, int]:
    """[start, stop) of rank's batch b in the global sequence (empty past the end)."""
    start = min((b * world_size + rank) * batch_size, length)
    return start, min(start + batch_size, length)


def window_bounds(n_shards: int, window_shards: int) -> np.ndarray:
    """Start index (into the shard order) of each window, plus the end: windows of >= window_shards shards."""
    n_windows = max(1, n_shards // max(1, window_shards))
    sizes = np.full(n_windows, n_shards // n_windows, np.int64)
    sizes[: n_shards % n_windows] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


class EpochPlan:
    """One epoch's global sequence over shards with `counts` samples each (see module docstring).

    `locate(start, stop)` gives (shard, k) for positions [start, stop); windows are built on demand and
    the last two are kept (a batch may straddle two). With `global_batch` (> 0), a shard's k's are
    handed out per reader head (`reader_streams`); without, in sequence order."""

    def __init__(self, counts: np.ndarray, *, seed: int, epoch: int, shuffle: bool, window_shards: int,
                 global_batch: int = 0, read_streams: int = 1):
        self.counts = np.asarray(counts, np.int64)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.global_batch, self.read_streams = global_batch, read_streams
        self.order = shard_order(len(self.counts), seed=seed, epoch=epoch, shuffle=shuffle)
        self.slot_of = np.empty(len(self.order), np.int64)  # shard -> its place in the order
        self.slot_of[self.order] = np.arange(len(self.order))
        self.bounds = window_bounds(len(self.counts), window_shards)
        per_window = np.add.reduceat(self.counts[self.order], self.bounds[:-1]) if len(self.counts) else np.zeros(0)
        self.window_start = np.concatenate([[0], np.cumsum(per_window)]).astype(np.int64)
        self.length = int(self.window_start[-1])
        self._windows: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, k) of every position of window w, in sequence order."""
        if w in self._windows:
            self._windows.move_to_end(w)
            return self._windows[w]
        members = self.order[self.bounds[w]:self.bounds[w + 1]]
        cnt = self.counts[members]
        slot = np.repeat(np.arange(len(members), dtype=np.int32), cnt)
        first = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, w, _WINDOW])
            slot = rng.permutation(slot)
            rotation = rng.integers(0, np.maximum(cnt, 1))
            # k = how many earlier positions (in head order, then sequence order) hold the same shard
            if self.global_batch > 0:
                heads = reader_streams(self.window_start[w] + np.arange(len(slot)), self.global_batch,
                                       self.read_streams)
                by_shard = np.lexsort((heads, slot))  # (lexsort is stable: ties keep sequence order)
            else:
                by_shard = np.argsort(slot, kind="stable")
            k = np.empty(len(slot), np.int64)
            k[by_shard] = np.arange(len(slot)) - np.repeat(first, cnt)
            k = (k + rotation[slot]) % cnt[slot]
        else:
            k = np.arange(len(slot), dtype=np.int64) - np.repeat(first, cnt)
        out = members[slot], k
        self._windows[w] = out
        while len(self._windows) > 2:
            self._windows.popitem(last=False)
        return out

    def window_of(self, shard: int) -> int:
        """The window that holds `shard` this epoch."""
        return int(np.searchsorted(self.bounds, self.slot_of[shard], side="right")) - 1

    def locate(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, k) for global positions [start, stop)."""
        shards, ks = [], []
        w = int(np.searchsorted(self.window_start, start, side="right")) - 1
        pos = start
        while pos < stop:
            s, k = self.window(w)
            lo, hi = pos - self.window_start[w], min(stop, self.window_start[w + 1]) - self.window_start[w]
            shards.append(s[lo:hi])
            ks.append(k[lo:hi])
            pos, w = int(self.window_start[w] + hi), w + 1
        if not shards:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(shards), np.concatenate(ks)
