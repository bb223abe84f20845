"""Everything torch.distributed: process-group setup from the torchrun environment, wrapping the model
(compile, then DDP or FSDP2), collectives the loops need, and full (unsharded) state dicts for checkpoints.

The loops only see `Dist` (rank, world size, device), `parallelize`, and the helpers below. Launch:
    torchrun --nproc_per_node=8 -m maws_train.cli mae b16_mae --set data.shards=DIR
(CUDA -> NCCL; CPU -> gloo, which is what the 2-process test uses).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> Dist:
    """Join the torchrun process group if WORLD_SIZE > 1; pick cuda:LOCAL_RANK when CUDA exists, else CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args: Any) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


def parallelize(
    model: nn.Module, *, d: Dist, mode: Literal["ddp", "fsdp"], compile: bool, blocks: list[nn.Module],
    compile_mode: str = "default",
) -> nn.Module:
    """Wrap `model` for training; returns the module to call. State dicts are taken from `model` itself.

    Order matters: torch.compile is applied first, in place, so it sits inside the data-parallel wrapper
    (per block for FSDP2, so each sharded block is one compiled graph and FSDP's all-gathers stay outside
    it; the whole model for DDP, whose gradient hooks on the parameters fire as usual). FSDP2 then shards
    each transformer block, then the root (embeddings, norms, heads).
    """
    if compile and d.device.type == "cuda":
        if mode == "fsdp":
            for blk in blocks:
                blk.compile(mode=compile_mode)
        else:
            model.compile(mode=compile_mode)
    if d.world_size == 1:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for blk in blocks:
            fully_shard(blk)
        fully_shard(model)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place, returned); a no-op on one process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_finite(model: nn.Module) -> bool:
    """True when every parameter (every rank's shard, under FSDP2) is finite; agreed across ranks."""
    bad = sum(int(not torch.isfinite(p.detach().to_local() if hasattr(p, "to_local") else p.detach()).all())
              for p in model.parameters())
    return all_reduce_sum(torch.tensor([bad], dtype=torch.int64)).item() == 0


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    """Every rank's `obj` (JSON-able), in rank order, on every rank."""
    if d.world_size == 1:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict with plain FQNs (no module./_orig_mod. prefixes), for DDP, FSDP2 or none."""
    return get_model_state_dict(model, options=_FULL)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded optimizer state keyed by parameter FQN (so it does not depend on parameter order)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def is_sharded(model: nn.Module) -> bool:
    """True under FSDP2 (parameters are DTensors): checkpoints are then written shard by shard."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _local(t: Any) -> Any:
    return t.to_local() if isinstance(t, DTensor) else t


def local_train_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's shards of the model and optimizer state, keyed by FQN, nothing gathered."""
    msd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, optimizer)
    state = {fqn: {name: _local(t) for name, t in st.items()} for fqn, st in osd["state"].items()}
    return {k: _local(v) for k, v in msd.items()}, {"state": state, "param_groups": osd["param_groups"]}


def _like(template: Any, local: torch.Tensor) -> Any:
    """`local` as this rank's shard of a tensor sharded like `template` (the model's own DTensor)."""
    if not isinstance(template, DTensor):
        return local.to(template.device)
    return DTensor.from_local(local.to(template.to_local().device), template.device_mesh, template.placements,
                              run_check=False, shape=template.shape, stride=template.stride())


def load_train_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, Any],
    *, sharded: bool = False,
) -> None:
    """Inverse of model_state/optimizer_state (every rank passes the full state; FSDP2 re-shards it), or,
    with `sharded`, of local_train_state (every rank passes the shards it wrote)."""
    if not sharded:
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_sd, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
        return
    template = get_model_state_dict(model)
    if set(template) != set(model_sd):
        raise ValueError(f"sharded checkpoint keys differ from the model's: {sorted(set(template) ^ set(model_sd))[:5]}")
    set_model_state_dict(model, {k: _like(template[k], v) for k, v in model_sd.items()})
    # AdamW's moments are sharded like their parameter; its step count is a plain scalar.
    state = {fqn: {name: _like(template[fqn], t) if t.dim() > 0 else t for name, t in st.items()}
             for fqn, st in optim_sd["state"].items()}
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": optim_sd["param_groups"]})
