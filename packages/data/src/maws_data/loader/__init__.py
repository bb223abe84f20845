"""The shard loader: batches for MAE / WSP / eval from a build's WebDataset shards.

    from maws_data.loader import LoaderConfig, build_loader
    loader = build_loader(LoaderConfig(shards="out/build", task="wsp", batch_size=256), rank=r, world_size=n)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for images, targets in loader:   # images float32 (N,3,S,S) ImageNet-normalised
            ...                          # targets: wsp float32 multi-hot (N, loader.num_classes),
                                         #          mae/eval int64 (N,) first label, -1 unlabeled
        ckpt["loader"] = loader.state_dict()   # a few integers; load_state_dict() resumes mid-epoch exactly

`shards` is a build folder (local, `s3://bucket/prefix` or `http://host/path`: its manifest.json),
a local shards/ folder, a glob or a list of tars. docs/loader.md states the policy in full.

The package, dependencies pointing one way (each imports only modules above it):
  config.py        LoaderConfig
  plan.py          epoch plans: pure functions of per-shard counts, seed, epoch, rank (numpy only)
  index.py         shard metadata from the manifest / stats; sidecars loaded per shard
  samples.py       plan (shard, k) -> sidecar rows of a batch (BatchSource)
  reader.py        JPEG bytes: local pread, remote ranged reads with retries
  buffers.py       Batch, reused output buffers
  cpu.py           the Pillow-SIMD backend (DataLoader workers)
  dali.py          the DALI backend (imported only for backend="dali")
  shard_loader.py  ShardLoader (epoch position, targets, resume state), build_loader
  (upgrade: `maws_data.sidecar.upgrade_build`, `maws-data upgrade BUILD`)

Memory per rank: O(#shards) for the index and each epoch's shard order, plus the sidecars of about
two shuffle windows (2 x window_shards shards) in each process that makes batches; for remote
shards, each such process's block cache (<= remote_cache_bytes, reader.py).
"""

from maws_data.loader.config import LoaderConfig
from maws_data.loader.index import ShardIndex, open_index, read_sidecar
from maws_data.loader.plan import EpochPlan, batches_per_epoch
from maws_data.loader.reader import SampleError, ShardFiles
from maws_data.loader.shard_loader import ShardLoader, build_loader, choose_backend
from maws_data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EpochPlan", "LoaderConfig", "SampleError", "ShardFiles", "ShardIndex",
           "ShardLoader", "batches_per_epoch", "build_loader", "choose_backend", "open_index", "read_sidecar"]
