"""Stage 1 of the build, the plan: which rows of which file make which shard.

A shard is a contiguous row range of ONE input file: file f's rows are cut into runs of
`shard_size` (the last run of a file may be shorter), files in source order. So the plan is a list
of small records (file, first row, end row, global row id of the first row, byte range for
CSV/JSONL) and never holds a row. Row ids are global and deterministic: row id = number of rows in
the files before + row number inside the file.

Text-pass units are runs of whole shards of one file, at most `unit_rows` rows (rounded to whole
shards): large enough that the per-unit overheads vanish, small enough that a worker holds only one.

Memory: O(files + shards).
"""

from __future__ import annotations

from dataclasses import dataclass

from maws_data import storage
from maws_data.digests import Entry
from maws_data.sources import FileLayout, SourceConfig, SourceFile, file_identity, scan_file


@dataclass(frozen=True, slots=True)
class Span:
    """Rows [first, end) of file `file` (an index into Plan.files); global ids row0 .. row0 + end - first."""

    file: int
    first: int
    end: int
    row0: int
    byte_range: tuple[int, int] | None = None  # CSV/JSONL: where these rows are in the file

    @property
    def rows(self) -> int:
        return self.end - self.first


@dataclass(frozen=True)
class Plan:
    files: tuple[SourceFile, ...]
    shards: tuple[Span, ...]  # shard i is shards[i]
    units: tuple[Span, ...]  # text-pass work units
    rows: int


@dataclass(frozen=True)
class ScanTask:
    file: SourceFile
    source: SourceConfig
    step: int
    known: Entry | None = None  # the file's digest entry remembered by an earlier build (maws_data.digests)

    @property
    def rows(self) -> int:
        return 0


def scan(task: ScanTask) -> tuple[FileLayout, dict, Entry | None]:
    """Runner entry point: one file's row count (and CSV/JSONL byte offsets), its identity for the
    build fingerprint (the sha256 of a local file: hashing thousands of files is parallel work too),
    and the digest entry to remember for it."""
    return scan_file(task.file, task.source, task.step), *file_identity(task.file, task.known)


@dataclass(frozen=True)
class ScanBatch:
    """Consecutive local files scanned by one task: through a local pool a task costs ~0.3 ms of
    hand-offs, five times a parquet footer's read (0.06 ms), so 400 files planned one task each took
    0.135 s against 0.02 s in one process. A remote file stays alone in its task: its footer is a
    round trip, and the runner keeps several in flight."""

    tasks: tuple[ScanTask, ...]

    @property
    def rows(self) -> int:
        return 0

    def name(self) -> str:
        more = f" and {len(self.tasks) - 1} more" if len(self.tasks) > 1 else ""
        return f"plan of {self.tasks[0].file.url}{more}"


BATCH_MAX_FILES = 32
BATCHES_PER_WORKER = 8  # the slowest file of a batch (a large CSV counted line by line) holds up only its batch


def scan_batches(tasks: list[ScanTask], workers: int) -> list[ScanBatch]:
    """The plan's tasks in source order: runs of up to BATCH_MAX_FILES local files, at least
    BATCHES_PER_WORKER batches a worker when there are that many files, and each remote file alone."""
    per = max(1, min(BATCH_MAX_FILES, len(tasks) // (BATCHES_PER_WORKER * max(1, workers))))
    out: list[ScanBatch] = []
    run: list[ScanTask] = []
    for t in tasks:
        if storage.is_remote(t.file.url):  # s3, http(s)
            if run:
                out.append(ScanBatch(tuple(run)))
                run = []
            out.append(ScanBatch((t,)))
            continue
        run.append(t)
        if len(run) == per:
            out.append(ScanBatch(tuple(run)))
            run = []
    if run:
        out.append(ScanBatch(tuple(run)))
    return out


def scan_batch(batch: ScanBatch) -> list[tuple[FileLayout, dict, Entry | None]]:
    """Runner entry point: `scan` of every file of the batch, in its order."""
    return [scan(t) for t in batch.tasks]


def cut(files: list[SourceFile], layouts: list[FileLayout], shard_size: int, unit_rows: int) -> Plan:
    """The plan, from each file's layout (see module docstring)."""
    shards: list[Span] = []
    units: list[Span] = []
    per_unit = max(1, unit_rows // shard_size)
    row0 = 0
    for fi, layout in enumerate(layouts):
        file_shards = []
        for j, first in enumerate(range(0, layout.rows, shard_size)):
            end = min(first + shard_size, layout.rows)
            rng = (layout.offsets[j], layout.offsets[j + 1]) if layout.offsets else None
            file_shards.append(Span(fi, first, end, row0 + first, rng))
        for k in range(0, len(file_shards), per_unit):
            group = file_shards[k:k + per_unit]
            rng = (group[0].byte_range[0], group[-1].byte_range[1]) if layout.offsets else None
            units.append(Span(fi, group[0].first, group[-1].end, group[0].row0, rng))
        shards.extend(file_shards)
        row0 += layout.rows
    return Plan(files=tuple(files), shards=tuple(shards), units=tuple(units), rows=row0)
