"""The epoch plan (maws_data.loader.plan) on synthetic shard layouts: guarantees, shuffle quality, resampling.

Pure functions of per-shard counts, seed, epoch and rank: no files. Sizes stay small (< 1 s each).
"""

from __future__ import annotations

import numpy as np
import pytest
from maws_data.loader.plan import (
    EpochPlan,
    batch_span,
    batches_per_epoch,
    epoch_length,
    reader_streams,
    resample_counts,
    shard_draws,
)
from maws_data.sidecar import sample_weights, sample_weights_csr


def rank_sequence(counts, *, rank, world, batch, drop_last=True, seed=0, epoch=0, shuffle=True, window=128):
    """(shard, k) of every sample rank yields in one epoch, batch by batch."""
    n = int(np.sum(counts))
    plan = EpochPlan(counts, seed=seed, epoch=epoch, shuffle=shuffle, window_shards=window, global_batch=world * batch,
                     read_streams=8)
    length = epoch_length(n, world_size=world, batch_size=batch, drop_last=drop_last)
    nb = batches_per_epoch(n, world_size=world, batch_size=batch, drop_last=drop_last)
    out = [plan.locate(*batch_span(b, rank=rank, world_size=world, batch_size=batch, length=length)) for b in range(nb)]
    return out


def min_distinct(shards: np.ndarray, width: int) -> int:
    """Fewest distinct values in any `width` consecutive entries."""
    counts = np.zeros(shards.max() + 1, np.int64)
    distinct = 0
    for s in shards[:width]:
        distinct += counts[s] == 0
        counts[s] += 1
    best = distinct
    for i in range(width, len(shards)):
        counts[shards[i - width]] -= 1
        distinct -= counts[shards[i - width]] == 0
        distinct += counts[shards[i]] == 0
        counts[shards[i]] += 1
        best = min(best, distinct)
    return int(best)


UNEQUAL = np.random.default_rng(7).integers(500, 1501, size=300)  # 300 shards of 500-1500 samples


@pytest.mark.parametrize("world,batch", [(1, 256), (8, 256), (8, 32)])
def test_shuffle_quality_1000_consecutive_samples_span_64_shards(world, batch):
    """The stated quality: with the default window (128 shards) any 1000 consecutive samples a rank yields
    come from >= 64 shards (builds of >= 128 shards; here 300 shards of 500-1500 samples, 3 epochs, rank 0
    and the last rank)."""
    for epoch in range(3):
        for rank in sorted({0, world - 1}):
            seq = np.concatenate([s for s, _ in rank_sequence(UNEQUAL, rank=rank, world=world, batch=batch,
                                                              epoch=epoch)])
            assert min_distinct(seq, 1000) >= 64, (world, batch, epoch, rank)
    # and without interleaving (a shard read whole, one after the other) it would be 2: the test can fail
    plain = np.repeat(np.arange(len(UNEQUAL)), UNEQUAL)
    assert min_distinct(plain, 1000) <= 2


@pytest.mark.parametrize("world,batch,drop_last", [(1, 7, True), (3, 16, True), (8, 5, True), (3, 16, False),
                                                   (8, 5, False)])
def test_every_sample_at_most_once_equal_batches(world, batch, drop_last):
    """drop_last: every rank the same number of full batches, no sample twice, none on two ranks, the
    left-out tail < world x batch. Without: every sample exactly once, equal batch counts (short/empty last)."""
    counts = np.array([16, 3, 0, 40, 1, 25, 9, 12, 30, 7] * 7)  # 70 unequal shards, one empty shard kind
    n = int(counts.sum())
    seen, nbs = [], set()
    for rank in range(world):
        batches = rank_sequence(counts, rank=rank, world=world, batch=batch, drop_last=drop_last, window=8)
        nbs.add(len(batches))
        if drop_last:
            assert all(len(s) == batch for s, _ in batches)
        seen += [(int(s), int(k)) for ss, ks in batches for s, k in zip(ss, ks)]
    assert len(nbs) == 1
    assert len(seen) == len(set(seen))
    assert all(0 <= k < counts[s] for s, k in seen)
    if drop_last:
        assert n - world * batch < len(seen) <= n
    else:
        assert len(seen) == n


def test_plans_differ_per_epoch_and_repeat_per_seed():
    counts = np.full(20, 50)
    a = np.concatenate([s * 100 + k for s, k in rank_sequence(counts, rank=0, world=2, batch=10, epoch=0, window=4)])
    b = np.concatenate([s * 100 + k for s, k in rank_sequence(counts, rank=0, world=2, batch=10, epoch=0, window=4)])
    c = np.concatenate([s * 100 + k for s, k in rank_sequence(counts, rank=0, world=2, batch=10, epoch=1, window=4)])
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # without reader streams a shard is read front to back from a rotation: its k's in sequence order
    # are consecutive mod n (with them, per reader: test_each_reader_reads_shards_in_few_stretches_front_to_back)
    plan = EpochPlan(counts, seed=0, epoch=0, shuffle=True, window_shards=4)
    s, k = plan.locate(0, plan.length)
    for shard in range(20):
        ks = k[s == shard]
        assert sorted(ks.tolist()) == list(range(50)) and np.all(np.diff(ks) % 50 == 1)


def test_no_shuffle_is_dataset_order():
    counts = np.array([4, 0, 3, 5])
    plan = EpochPlan(counts, seed=0, epoch=3, shuffle=False, window_shards=1)
    s, k = plan.locate(0, 12)
    assert s.tolist() == [0] * 4 + [2] * 3 + [3] * 5 and k.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]
    assert [x.tolist() for x in plan.locate(3, 9)] == [[0, 2, 2, 2, 3, 3], [3, 0, 1, 2, 0, 1]]


def test_sqrt_weights_flatten_class_counts_vectorised():
    """Classes with 6400/1600/100 samples: weights 1/sqrt(n) of the rarest label, CSR == lists."""
    labels = [[0]] * 4 + [[1], [0, 2], [], [2, 1]]
    counts = [6400, 1600, 100]
    w = sample_weights(labels, counts)
    assert w.tolist() == pytest.approx([1 / 80] * 4 + [1 / 40, 1 / 10, 0.0, 1 / 10])
    ptr = np.concatenate([[0], np.cumsum([len(x) for x in labels])])
    flat = np.array([c for x in labels for c in x])
    assert np.array_equal(sample_weights_csr(ptr, flat, counts), w)


def test_resampling_by_shards_matches_the_exact_global_draw():
    """Sqrt resampling as per-shard multinomial + draws inside shards vs the exact global draw (today's
    `rng.choice(pool, p=w)` over every sample): per-class frequencies agree within sampling error.

    1,000 samples in 40 shards of unequal sizes and class mixes, 3 classes of 640/250/110 samples
    (frequency ratio 5.8 -> sqrt 2.4); 200 epochs of 1,000 draws each way."""
    rng = np.random.default_rng(0)
    classes = np.repeat([0, 1, 2], [640, 250, 110])
    rng.shuffle(classes)
    sizes = rng.multinomial(1000 - 40 * 5, np.ones(40) / 40) + 5
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    counts = np.bincount(classes)
    w = 1 / np.sqrt(counts[classes])                              # per-sample weight (single label)
    shard_w = np.add.reduceat(w, bounds[:-1])                     # what the builder stores per shard
    epochs, draws = 200, 1000
    ours = np.zeros(3)
    for epoch in range(epochs):
        m = resample_counts(shard_w, draws, seed=0, epoch=epoch)
        for s in np.flatnonzero(m):
            rows = shard_draws(w[bounds[s]:bounds[s + 1]], int(m[s]), seed=0, epoch=epoch, shard=int(s))
            ours += np.bincount(classes[bounds[s] + rows], minlength=3)
    exact = np.zeros(3)
    p = w / w.sum()
    for epoch in range(epochs):
        exact += np.bincount(classes[np.random.default_rng([1, epoch]).choice(1000, size=draws, p=p)], minlength=3)
    total = epochs * draws
    expected = total * np.sqrt(counts) / np.sqrt(counts).sum()    # class c drawn in proportion to sqrt(n_c)
    sigma = np.sqrt(expected * (1 - expected / total))
    assert np.all(np.abs(ours - expected) < 4 * sigma), (ours, expected)
    assert np.all(np.abs(exact - expected) < 4 * sigma), (exact, expected)
    assert np.all(np.abs(ours - exact) < 4 * np.sqrt(2) * sigma)
    assert ours[0] / ours[2] == pytest.approx(np.sqrt(640 / 110), rel=0.05)


def process_reads(plan: EpochPlan, counts, *, rank: int, world: int, batch: int, workers: int, worker: int,
                  streams: int) -> tuple[dict, dict]:
    """What worker `worker` of `workers` on `rank` reads: shard -> its k's, and (shard, head) -> k's in
    read order (head = slot and stream of the position, plan.reader_streams)."""
    n = int(np.sum(counts))
    nb = batches_per_epoch(n, world_size=world, batch_size=batch, drop_last=False)
    by_shard: dict[int, list[int]] = {}
    by_head: dict[tuple[int, int], list[int]] = {}
    for b in range(worker, nb, workers):
        start, stop = batch_span(b, rank=rank, world_size=world, batch_size=batch, length=n)
        heads = reader_streams(np.arange(start, stop), world * batch, streams)
        for s, k, h in zip(*plan.locate(start, stop), heads):
            by_shard.setdefault(int(s), []).append(int(k))
            by_head.setdefault((int(s), int(h)), []).append(int(k))
    return by_shard, by_head


def cyclic_runs(ks: list[int], n: int) -> int:
    """Contiguous runs of a set of k's on the circle 0..n-1."""
    ks = np.unique(ks)
    return 1 if len(ks) == n else int(np.sum(np.diff(np.append(ks, ks[0] + n)) != 1))


@pytest.mark.parametrize("world,workers", [(1, 2), (2, 1), (4, 4), (8, 8), (2, 8)])
def test_each_reader_reads_shards_in_few_stretches_front_to_back(world, workers):
    """With read_streams=8: every reader head of every (rank, worker) reads each shard front to back (the
    next sample every time), and a (rank, worker) reads a shard as at most 8 / world contiguous
    stretches, so remote blocks can be large. Without heads (read_streams=1), worker w of W reads every
    W-th group of each shard: it jumps (the test can fail)."""
    counts = np.array([1200, 750, 0, 2000, 310] * 6)
    batch = 8

    def worst(streams: int) -> tuple[int, int]:
        plan = EpochPlan(counts, seed=3, epoch=1, shuffle=True, window_shards=8, global_batch=world * batch,
                         read_streams=streams)
        jumps = runs = 0
        for rank in range(world):
            for w in range(workers):
                by_shard, by_head = process_reads(plan, counts, rank=rank, world=world, batch=batch, workers=workers,
                                                  worker=w, streams=streams)
                for (s, _), ks in by_head.items():
                    jumps = max(jumps, int(np.sum(np.diff(ks) % counts[s] != 1)))
                for s, ks in by_shard.items():
                    runs = max(runs, cyclic_runs(ks, int(counts[s])))
        return jumps, runs

    jumps, runs = worst(8)
    assert jumps == 0 and runs <= max(1, 8 // world)
    if workers > 1:
        assert worst(1)[0] > 4  # a single head per rank, split over workers: jumps


def test_one_process_and_several_ranks_see_the_same_global_batches():
    """The reader heads depend on the global batch, not on how it is split into ranks: one process with
    batch 24 and 3 ranks with batch 8 get the same samples at every position (the trainers compare
    losses of 1 and 2 processes), and the shard at every position is the one without heads."""
    counts = np.array([120, 75, 0, 200, 31] * 6)
    one = rank_sequence(counts, rank=0, world=1, batch=24, window=8)
    three = [rank_sequence(counts, rank=r, world=3, batch=8, window=8) for r in range(3)]
    for b, (s, k) in enumerate(one):
        assert np.array_equal(s, np.concatenate([three[r][b][0] for r in range(3)]))
        assert np.array_equal(k, np.concatenate([three[r][b][1] for r in range(3)]))
    plain = EpochPlan(counts, seed=0, epoch=0, shuffle=True, window_shards=8)
    assert np.array_equal(np.concatenate([s for s, _ in one]), plain.locate(0, 24 * len(one))[0])
