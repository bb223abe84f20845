"""Where a run continues from, the endless batch stream, and the step-derived seeds both loops use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        return p
    states = list_states(p)
    if not states:
        raise CheckpointError(f"--resume {p}: no complete checkpoint (ckpt/step_*/state.json) there")
    return states[-1]


# Settings a resumed run may change: how it runs, logs and checkpoints, and where files are. Every other
# field changes what is computed (model, objective, optimizer, schedule, data order), so a run resumed
# with it changed would be neither the old run nor a new one.
RESUMABLE_CHANGES = frozenset({
    "run.out", "run.resume", "run.log_every", "run.ckpt_every", "run.keep_ckpts", "run.compile",
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
