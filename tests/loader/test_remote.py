"""The same build read from local disk, from `s3://` (a real SeaweedFS server) and from `http://127.0.0.1`
gives identical batches; a dropped HTTP connection is retried."""

from __future__ import annotations

import pytest
import torch
from maws_data.loader import LoaderConfig, build_loader
from maws_data.loader.index import retrying

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
