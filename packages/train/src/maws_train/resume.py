"""Where a run continues from, the endless batch stream, and the step-derived seeds both loops use."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from maws_train import checkpoint, distributed
from maws_train.checkpoint import CheckpointError, list_states


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A distinct 63-bit seed per (seed, step, rank), so randomness needs no saved RNG state."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + 1) % (2**63 - 1)


def find_resume_point(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint directory to continue from, or None to start fresh.

    "auto": the newest complete ckpt/step_* in the run dir, if any. "never": start fresh, but refuse to
    if the run dir already holds checkpoints (that run would be overwritten). Anything else is a path:
    a step directory, or a run directory whose newest checkpoint is used.
    """
    if resume == "auto":
        states = list_states(run_dir)
        return states[-1] if states else None
    if resume == "never":
        if list_states(run_dir):
            raise CheckpointError(f"{run_dir} already holds checkpoints; resume it (resume=auto) or choose another --out")
        return None
    p = Path(resume)
    if (p / "state.json").exists():
        chosen = p
    else:
        states = list_states(p)
        if not states:
            raise CheckpointError(f"--resume {p}: no complete checkpoint (ckpt/step_*/state.json) there")
        chosen = states[-1]
    # Going back to an older step while newer ones sit in the output folder would mix two histories:
    # pruning keeps the newest steps (it could delete what this run writes) and resume=auto after a
    # crash would continue the abandoned one.
    step = json.loads((chosen / "state.json").read_text())["step"]
    newer = [s.name for s in list_states(run_dir)
             if json.loads((s / "state.json").read_text())["step"] > step and s.resolve() != chosen.resolve()]
    if newer:
        raise CheckpointError(f"--resume {chosen} (step {step}) but {run_dir / 'ckpt'} holds newer checkpoints "
                              f"({', '.join(newer)}): move or delete them to go back to step {step}, or use another --out")
    return chosen


# Settings a resumed run may change: how it runs, logs and checkpoints, and where files are. Every other
# field changes what is computed (model, objective, optimizer, schedule, data order), so a run resumed
# with it changed would be neither the old run nor a new one.
RESUMABLE_CHANGES = frozenset({
    "run.out", "run.resume", "run.log_every", "run.ckpt_every", "run.keep_ckpts", "run.compile", "run.compile_mode",
    "data.num_workers", "data.backend",  # backends make the same crops; pixels agree within a grey level
    "data.shards",  # the path may move; the loader state checks that the shards themselves are the same
    "init",  # read only when a WSP run starts; a resumed run takes its weights from the checkpoint
})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def check_same_run(saved: dict[str, Any], current: dict[str, Any], *, kind: str, where: Path) -> None:
    """Refuse to resume the checkpoint at `where` (its resolved config `saved`) with settings `current`
    that would make it another run; lists every differing field."""
    if saved.get("kind", kind) != kind:
        raise CheckpointError(f"{where} is a {saved['kind']} checkpoint; this is a {kind} run (choose another --out)")
    old, new = _flatten({k: v for k, v in saved.items() if k not in ("kind", "derived")}), _flatten(current)
    diffs = [f"{k}: {old.get(k, '<absent>')!r} in the checkpoint, {new.get(k, '<absent>')!r} now"
             for k in sorted(set(old) | set(new)) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]
    if diffs:
        raise CheckpointError(f"cannot resume {where} with other settings ({'; '.join(diffs)}): resume with the "
                              "settings it was started with, or start a new run (another --out, or resume=never "
                              "in an empty folder)")


def endless(loader: Any) -> Iterator[Any]:
    """Batches across epoch boundaries; starts at the loader's (possibly resumed) epoch and position."""
    while True:
        yield from loader
        loader.set_epoch(loader.epoch + 1)


def restore(resume_dir: Path, *, model: Any, optimizer: Any, loader: Any, config: dict[str, Any], kind: str,
            d: distributed.Dist) -> dict[str, Any]:
    """Load a checkpoint into the (wrapped-for-training) model, optimizer and loader; returns its meta.
    Refused when it is another run's (check_same_run) or was written by another number of processes."""
    model_sd, optim_sd, meta = checkpoint.load_state(resume_dir, rank=d.rank, world_size=d.world_size)
    check_same_run(meta.get("config", {}), config, kind=kind, where=resume_dir)
    if len(meta["loader"]) != d.world_size:  # the loader's epoch plan depends on the number of ranks
        raise CheckpointError(f"{resume_dir} was written by {len(meta['loader'])} processes, this run has "
                              f"{d.world_size}; resume with the same number of processes")
    distributed.load_train_state(model, optimizer, model_sd, optim_sd, sharded=meta.get("shards") is not None)
    loader.load_state_dict(meta["loader"][d.rank])
    return meta


def save(out: Path, step: int, *, model: Any, optimizer: Any, loader: Any, resolved: dict[str, Any],
         d: distributed.Dist, keep: int) -> Path:
    """A training checkpoint of step `step` (every rank calls it): FSDP2 runs write one shard per rank,
    nothing gathered; others gather the full state on rank 0, which writes it."""
    meta = {"loader": distributed.gather_objects(loader.state_dict(), d), "config": resolved,
            "world_size": d.world_size}
    if distributed.is_sharded(model):
        model_shard, optim_shard = distributed.local_train_state(model, optimizer)
        return checkpoint.save_state_shard(out, step=step, rank=d.rank, world_size=d.world_size,
                                           model_shard=model_shard, optim_shard=optim_shard, meta=meta,
                                           barrier=distributed.barrier, keep=keep)
    model_sd, optim_sd = distributed.model_state(model), distributed.optimizer_state(model, optimizer)
    path = out / "ckpt" / f"step_{step:06d}"
    if d.is_main:
        path = checkpoint.save_state(out, step=step, model_state=model_sd, optim_state=optim_sd, meta=meta, keep=keep)
    distributed.barrier()
    return path
