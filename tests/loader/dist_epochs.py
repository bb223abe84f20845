"""Run by tests/loader/test_dist.py under torchrun (2 gloo processes): 3 epochs of the loader on the tiny
build, each step checked with collectives; optionally stopped at (epoch, batch) with the state saved, or
resumed from saved states. Writes, per rank, the keys of every batch it yielded to OUT/keys-RANK.json.

    python -m torch.distributed.run --standalone --nproc_per_node=2 dist_epochs.py BUILD OUT [--stop E B | --resume]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from maws_data.loader import LoaderConfig, build_loader


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("build")
    p.add_argument("out", type=Path)
    p.add_argument("--task", default="mae")
    p.add_argument("--stop", type=int, nargs=2)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = LoaderConfig(shards=args.build, task=args.task, batch_size=4, image_size=16, backend="webdataset",
                       num_workers=1, drop_last=args.task != "eval")
    loader = build_loader(cfg, rank=rank, world_size=world)
    keys_path, state_path = args.out / f"keys-{rank}.json", args.out / f"state-{rank}.json"
    log = json.loads(keys_path.read_text()) if args.resume else []
    if args.resume:
        loader.load_state_dict(json.loads(state_path.read_text()))
    for epoch in range(loader.epoch, 3):
        loader.set_epoch(epoch)
        for images, _ in loader:
            n = torch.tensor([len(images)])
            dist.all_reduce(n)  # a rank with fewer batches than the other would hang here
            log.append([epoch, loader.position - 1, list(loader.last_batch_keys)])
            if args.stop and [epoch, loader.position] == args.stop:
                state_path.write_text(json.dumps(loader.state_dict()))
                keys_path.write_text(json.dumps(log))
                dist.destroy_process_group()
                return
    counts = torch.tensor([len(loader)])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    assert int(counts) == len(loader)
    keys_path.write_text(json.dumps(log))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
