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


def endless(loader: Any) -> Iterator[Any]:
    """Batches across epoch boundaries; starts at the loader's (possibly resumed) epoch and position."""
    while True:
        yield from loader
        loader.set_epoch(loader.epoch + 1)
