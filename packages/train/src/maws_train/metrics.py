"""The run record: config.json, metrics.jsonl (main rank only), and the non-finite-loss guard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from maws_train.checkpoint import write_json_atomic


class NonFiniteLossError(RuntimeError):
    """Raised when the loss is NaN or inf; the run stops and the last good checkpoint stays in place."""


def check_finite(loss: float, *, step: int, run_dir: Path, last_ckpt: Path | None) -> None:
    if not math.isfinite(loss):
        kept = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        raise NonFiniteLossError(f"loss is {loss} at step {step} in {run_dir}; stopping ({kept})")


class MetricWriter:
    """Appends one JSON object per line to RUN/metrics.jsonl. A no-op on non-main ranks."""

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int = 0) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        if enabled and self.path.exists():
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
        tmp = self.path.with_name(".tmp-metrics.jsonl")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def write_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    write_json_atomic(run_dir / "config.json", resolved)
