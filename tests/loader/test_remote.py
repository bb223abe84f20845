"""The same build read from local disk, from `s3://` (a real SeaweedFS server) and from `http://127.0.0.1`
gives identical batches; a dropped HTTP connection is retried."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from maws_data.loader import LoaderConfig, build_loader
from maws_data.loader.index import retrying
from maws_data.loader.reader import BlockCache

S = 24


def epoch(shards: str, task: str, epoch_no: int = 1, **kw) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
    base = {"batch_size": 4, "image_size": S, "backend": "webdataset", "num_workers": 0}
    loader = build_loader(LoaderConfig(shards=shards, task=task, **{**base, **kw}), rank=1, world_size=2)
    loader.set_epoch(epoch_no)
    return [(list(loader.last_batch_keys), x.clone(), y) for x, y in loader]


def same(a, b) -> bool:
    return len(a) == len(b) > 0 and all(ka == kb and torch.equal(xa, xb) and torch.equal(ya, yb)
                                        for (ka, xa, ya), (kb, xb, yb) in zip(a, b))


@pytest.mark.parametrize("task,kw", [("mae", {"num_workers": 2}), ("wsp", {"resample": "sqrt"}),
                                     ("eval", {"drop_last": False})])
def test_local_s3_and_http_give_identical_batches(tiny_build, s3_build, http_build, task, kw):
    url, handler = http_build
    local = epoch(str(tiny_build), task, **kw)
    assert same(epoch(s3_build, task, **kw), local)
    handler.served.clear()
    assert same(epoch(url, task, **kw), local)
    # read in ranges of nearby samples, not one request per sample: a batch of 4 is at most 4 ranges
    tar_gets = [p for p in handler.served if p.endswith(".tar")]
    assert 0 < len(tar_gets) <= 4 * len(local)


def test_dropped_connection_is_retried(http_build, tiny_build):
    url, handler = http_build
    want = epoch(str(tiny_build), "mae", 0)
    handler.drop.update({"shard-000001.tar": 2, "shard-000002.samples.npz": 1})
    loader = build_loader(LoaderConfig(shards=url, task="mae", batch_size=4, image_size=S, backend="webdataset",
                                       num_workers=0), rank=1, world_size=2)
    got = [(list(loader.last_batch_keys), x.clone(), y) for x, y in loader]
    assert same(got, want)
    assert handler.drop == {"shard-000001.tar": 0, "shard-000002.samples.npz": 0}  # both were cut, and retried
    assert retrying.count >= 3 and not loader.skipped


def test_dali_reads_remote_shards_through_the_host_reader(http_build, tiny_build):
    pytest.importorskip("nvidia.dali")
    url, _ = http_build
    want = epoch(str(tiny_build), "eval", 0, backend="dali", drop_last=False)
    assert same(epoch(url, "eval", 0, backend="dali", drop_last=False), want)


def test_a_list_of_remote_tars_reads_their_stats_and_the_vocabulary(http_build, tiny_build):
    """No manifest: shard counts from each tar's stats JSON, vocabulary.tsv found above shards/ (over http)."""
    url, _ = http_build
    names = [f"shards/shard-{i:06d}.tar" for i in range(4)]
    local = epoch(tuple(str(tiny_build / n) for n in names), "wsp")
    assert same(epoch(tuple(f"{url}/{n}" for n in names), "wsp"), local)


def run(shards: str, *, world: int = 1, **kw) -> tuple[list, object]:
    """(batches of the last rank for epoch 1, its loader)."""
    cfg = {"task": "mae", "batch_size": 4, "image_size": S, "backend": "webdataset", "num_workers": 0, **kw}
    loader = build_loader(LoaderConfig(shards=shards, **cfg), rank=world - 1, world_size=world)
    loader.set_epoch(1)
    return [(list(loader.last_batch_keys), x.clone(), y) for x, y in loader], loader


def tar_ranges(handler) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for path, a, b in handler.ranges:
        if path.endswith(".tar"):
            out.setdefault(path, []).append((a, b))
    return out


def owned_bytes(loader, planned) -> int:
    """Bytes of the tars from each planned sample's JPEG to the next sample's (tar headers, its .json and
    .cls between them): what reading exactly those samples in contiguous ranges can cost at most."""
    total = 0
    for s in {int(sh) for p in planned for sh in p.shard}:
        off = loader.source.shard(1, s, 0).samples.jpg_offset
        nxt = np.append(off[1:], off[-1])
        rows = np.concatenate([p.row[p.shard == s] for p in planned])
        total += int(np.sum(np.maximum(nxt[rows] - off[rows], 0)))
    return total + sum(int(p.size.sum()) for p in planned)


BLOCK = 24 << 10  # the tiny build's shards are ~90 KB: a few blocks each


@pytest.mark.parametrize("workers,world", [(0, 1), (2, 1), (2, 2)])
def test_remote_reads_are_blocks_of_what_this_rank_reads(tiny_build, http_build, workers, world):
    """Over an epoch, a rank's remote requests are at most (bytes read / block) + 3 per (shard, process)
    (the block-aligned cells a process's stretch of a shard touches, wrapping once), no tar byte is
    fetched twice (no process reads what another worker or rank reads) and little besides the JPEGs
    (tar headers and the .json/.cls members between them). The per-batch ranges
    (remote_block_bytes=0) make about one request per shard per batch: more than that bound
    (in-process, where the bound is tight enough to tell)."""
    url, handler = http_build
    local, loader = run(str(tiny_build), world=world, num_workers=workers)
    planned = [loader.source.batch(1, b)[0] for b in range(len(loader))]
    needed = sum(int(s.size.sum()) for s in planned)
    pairs = len({(int(sh), b % max(1, workers)) for b, s in enumerate(planned) for sh in s.shard})
    handler.ranges.clear()
    got, _ = run(url, world=world, num_workers=workers, remote_block_bytes=BLOCK)
    assert same(got, local)
    ranges = tar_ranges(handler)
    requests = sum(len(r) for r in ranges.values())
    served = sum(b - a for rs in ranges.values() for a, b in rs)
    bound = served / BLOCK + 3 * pairs
    assert 0 < requests <= bound, (requests, bound)
    for path, rs in ranges.items():  # every byte at most once: sorted ranges do not overlap
        rs.sort()
        assert all(a1 >= b0 for (_, b0), (a1, _) in itertools.pairwise(rs)), path
    assert needed <= served <= owned_bytes(loader, planned)
    if workers == 0:
        handler.ranges.clear()
        assert same(run(url, world=world, remote_block_bytes=0)[0], local)
        per_batch = sum(len(r) for r in tar_ranges(handler).values())
        assert per_batch > bound, (per_batch, bound, requests)


def test_block_cache_stays_within_its_budget(tiny_build, http_build):
    """A cache smaller than a block for every (shard, stream) of the window: blocks shrink to fit, the
    cache never holds more than its budget, and the batches are still the local ones."""
    url, _ = http_build
    local, _ = run(str(tiny_build))
    budget = 400 << 10  # 100 KiB per shard of the window, 8 streams: blocks of ~12 KiB, not the 8 MiB asked
    loader = build_loader(LoaderConfig(shards=url, task="mae", batch_size=4, image_size=S, backend="webdataset",
                                       num_workers=0, remote_cache_bytes=budget), rank=0, world_size=1)
    loader.set_epoch(1)
    got, peak = [], 0
    for x, y in loader:
        cache = loader._files.cache
        assert cache.used == sum(len(d) for d in cache.blocks.values()) <= budget
        peak = max(peak, cache.used)
        got.append((list(loader.last_batch_keys), x.clone(), y))
    assert same(got, local) and peak > 0
    assert loader._files.requests < sum(len(x) for _, x, _ in got)  # blocks still hold several samples


def test_block_cache_drops_the_least_recently_used_block():
    cache = BlockCache(100)
    cache.put((0, 0, 40), b"a" * 40)
    cache.put((1, 0, 40), b"b" * 40)
    assert cache.get((0, 0, 40)) == b"a" * 40       # (0, ...) is now the most recent
    cache.put((2, 0, 40), b"c" * 40)                # evicts (1, ...)
    assert set(cache.blocks) == {(0, 0, 40), (2, 0, 40)} and cache.used == 80
    cache.drop((0, 0, 40))
    assert cache.used == 40 and cache.get((0, 0, 40)) is None
    cache.put((3, 0, 101), b"e" * 101)              # larger than the budget: not kept
    assert (3, 0, 101) not in cache.blocks and cache.used == 40
