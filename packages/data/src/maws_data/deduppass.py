"""Stage 5 of the build, the dedup pass (`--dedup exact|near`): decide which written samples repeat an
earlier one, then rewrite the shards that hold them, so the final tars hold the clean set.

    counts = dedup_pass(plan, out=out, work=work, mode="near", threshold=2, runner=runner)

Every shard task of the image pass wrote a unit file (`<work>/dedup/units/shard-NNNNNN.npz`: the
rows it wrote, their sample keys, sha256 and phash) before its commit marker. This stage:
  1. decide: `maws_data.dedup.table.dedup` over the unit files (spill -> reduce per partition ->
     resolve in row order; docs/dedup.md), on the local runner's worker processes. The decisions go
     to `<work>/dedup/decisions.npz`, which is this stage's own commit marker: a resumed build that
     finds it does not decide again.
  2. filter: one runner task per shard that lost a sample (`dedup.filter.filter_shard_at`): the tar,
     its DALI index and sidecar are rewritten without the removed samples, and the removed rows go
     into the stats' skipped rows (`duplicate_image` / `near_duplicate`, the detail naming the kept
     sample's key), so finish.py counts them like any other skip. Filtering is idempotent.
A resume after a kill at any point gives the same bytes: a shard that was half-rewritten fails its
size/sha256 check, so the image pass rewrites it (same bytes and unit file as the first time) and
this stage filters it again from the saved decisions.

On object storage the unit files are copied to a local scratch folder first (the spill and reduce
steps seek in local files); with the Ray runner the decide step runs on the driver's machine
(`processes` local processes) and the filter tasks on the cluster.

Memory: the driver holds the decisions, O(removed rows); a decide task holds one spill or one
partition (docs/dedup.md "At scale"), a filter task one shard. Local scratch disk: the unit files
(~40 B per written row + its key) and the spills (24 B per row for exact, 168 B for near at k = 2).
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from maws_data import storage
from maws_data.dedup.filter import filter_shard_at
from maws_data.dedup.table import DECISIONS, SPILLS, UNITS, Decisions, dedup
from maws_data.manifest import exists, read_bytes, remove, write_bytes
from maws_data.plan import Plan
from maws_data.runner import Runner
from maws_data.shards import shard_stem

DEDUP_DIR = "dedup"  # under the build's work folder
SHARDS_DIR = "shards"


@dataclass(frozen=True)
class FilterJob:
    index: int
    out: str  # the build folder / prefix
    drop: dict  # sample KEY -> skip record (Decisions.for_rows)

    @property
    def rows(self) -> int:
        return 0  # the image pass already counted this shard's rows

    def name(self) -> str:
        return f"{shard_stem(self.index)} (dedup filter, {len(self.drop)} samples)"


@dataclass(frozen=True)
class _Call:
    """One call of a dedup library step, as a runner task (results are put back in call order)."""

    order: int
    fn: Callable
    args: tuple

    def name(self) -> str:
        return f"dedup {self.fn.__name__} #{self.order}"


def _call(c: _Call):
    return c.fn(*c.args)


def runner_map(runner: Runner, desc: str) -> Callable:
    """A `map(fn, *iterables)` for `dedup(..., map_fn=)` that runs the calls on the runner."""
    def map_fn(fn: Callable, *iterables) -> list:
        calls = [_Call(i, fn, args) for i, args in enumerate(zip(*iterables))]
        results = [None] * len(calls)
        for call, result in runner.map(_call, calls, desc=desc):
            results[call.order] = result
        return results
    return map_fn


_counts: dict[str, tuple[int, ...]] = {}


def _class_counts(out: str) -> tuple[int, ...]:
    """The vocabulary's counts (for the shards' sqrt_weight), read once per worker process."""
    if out not in _counts:
        _counts.clear()
        voc = pl.read_csv(io.BytesIO(read_bytes(storage.join(out, "vocabulary.tsv"))), separator="\t",
                          schema_overrides={"wnid": pl.String, "name": pl.String, "hashtags": pl.String})
        _counts[out] = tuple(int(c) for c in voc["count"])
    return _counts[out]


def run_filter(job: FilterJob) -> dict:
    stats = filter_shard_at(storage.join(job.out, SHARDS_DIR), job.index, job.drop, class_counts=_class_counts(job.out))
    return {k: v for k, v in stats.items() if k != "skipped_rows"}


@contextmanager
def _local_table(table_url: str) -> Iterator[Path]:
    """The dedup table as a local folder: itself, or a scratch copy of a remote one's unit files."""
    if not storage.is_remote(table_url):
        Path(table_url).mkdir(parents=True, exist_ok=True)
        yield Path(table_url)
        return
    scratch = Path(tempfile.mkdtemp(prefix="maws-dedup-"))
    try:
        fs, base = storage.filesystem(table_url)
        (scratch / UNITS).mkdir()
        units = f"{base}/{UNITS}"
        names = [p for p in fs.ls(units, detail=False, refresh=True) if p.endswith(".npz")] if fs.exists(units) else []
        if names:  # one batched call: s3fs fetches them concurrently
            fs.get(names, [str(scratch / UNITS / p.rsplit("/", 1)[-1]) for p in names])
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def decide(work: str, *, mode: str, threshold: int, map_fn: Callable | None, processes: int) -> Decisions:
    """The decisions of this build: read back if saved (resume), else computed from the unit files and saved."""
    table_url = storage.join(work, DEDUP_DIR)
    decisions_url = storage.join(table_url, DECISIONS)
    if exists(decisions_url):
        return Decisions.from_bytes(read_bytes(decisions_url))
    with _local_table(table_url) as table_dir:
        decisions = dedup(table_dir, mode=mode, threshold=threshold, map_fn=map_fn, processes=processes)  # type: ignore[arg-type]
        shutil.rmtree(table_dir / SPILLS, ignore_errors=True)
    if storage.is_remote(decisions_url):
        write_bytes(decisions_url, decisions.to_bytes())
    return decisions


def dedup_pass(plan: Plan, *, out: str, work: str, mode: str, threshold: int, runner: Runner,
               processes: int) -> dict[str, int]:
    """Decide, then filter every shard that lost a sample; returns the removed rows by reason."""
    map_fn = runner_map(runner, "dedup") if runner.cfg.kind == "local" else None
    decisions = decide(work, mode=mode, threshold=threshold, map_fn=map_fn, processes=processes)

    def jobs():
        for i, span in enumerate(plan.shards):
            records = decisions.for_rows(span.row0, span.row0 + span.rows)
            if records:
                yield FilterJob(index=i, out=out, drop={r["key"]: r for r in records})

    for _ in runner.map(run_filter, jobs(), desc="dedup filter"):
        pass
    return decisions.counts()


def remove_table(work: str) -> None:
    """Remove the dedup table, decisions last: while decisions.npz exists a resume reuses it, and a
    resume that finds no decisions finds no unit files either (so it decides nothing from a partial set)."""
    table_url = storage.join(work, DEDUP_DIR)
    for name in (UNITS, SPILLS):
        remove(storage.join(table_url, name))
    remove(storage.join(table_url, DECISIONS))
