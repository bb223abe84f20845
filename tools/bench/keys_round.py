"""The text pass's keys round at a billion-row shape: (spill file, bucket) reads with and without the merge round.

The keys round reads one byte range per (spill file, bucket). Without merging, spill files are the
text units', so the reads grow with units x buckets = rows^2 / (unit rows x 250k): 16k at 10^7 rows
of 25k-row files, 160M at 10^9. Past `textpass.MERGE_MIN_READS` a merge round first joins runs of
units into ~`GROUP_ROWS`-row files (bytes copied, no Arrow decode), and the keys round reads
(units / group) x buckets ranges.

This bench writes real unit spills (`textpass._spill_bytes`, unique synthetic keys) for --units
units of --unit-rows rows over --buckets buckets (default 400 x 25k rows over 4,000 buckets: the
10^9-row build's bucket count, and units x buckets = 1.6M reads), then times, in this process:
`resolve_keys` on a sample of buckets reading the unit spills; the merge round (every group); and
`resolve_keys` on the same buckets reading the groups. It prints the time per bucket both ways,
the whole round projected over every bucket, and the ratio. Every keys task's result (duplicates,
renamed) must be the same both ways.

    uv run python tools/bench/keys_round.py
    uv run python tools/bench/keys_round.py --units 100 --buckets 1000 --sample 20
    MAWS_S3_ENDPOINT=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=k AWS_SECRET_ACCESS_KEY=s \
        uv run python tools/bench/keys_round.py --work s3://test/keys-bench --sample 2   # on object storage
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import polars as pl
from maws_data import storage, textpass
from maws_data.manifest import write_bytes


def write_units(work: str, units: int, unit_rows: int, buckets: int) -> None:
    for u in range(units):
        rows = pl.int_range(u * unit_rows, (u + 1) * unit_rows, dtype=pl.UInt64, eager=True).alias("row")
        df = pl.DataFrame([rows]).with_columns(("key-" + pl.col("row").cast(pl.String)).alias("key"))
        df = df.with_columns(pl.col("key").alias("safe"))
        df = df.with_columns(textpass._bucket_of(df["safe"], buckets).alias("bucket"))
        write_bytes(textpass._unit_url(work, u), textpass._spill_bytes(df, buckets), durable=False)


def time_keys(work: str, units: int, starts: tuple[int, ...], sample: list[int], group: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    results = [textpass.resolve_keys(textpass.KeyTask(b, work, units, starts, group)) for b in sample]
    return (time.perf_counter() - t0) / len(sample), results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=400)
    ap.add_argument("--unit-rows", type=int, default=25_000)
    ap.add_argument("--buckets", type=int, default=4_000)
    ap.add_argument("--sample", type=int, default=40, help="buckets timed (spread over all)")
    ap.add_argument("--group", type=int, default=0, help="units per merged spill (default: what the build would "
                                                          "choose, textpass.spill_group)")
    ap.add_argument("--work", default=None, help="where the spills go: a folder or s3://bucket/prefix (default: a "
                                                 "temporary folder); removed afterwards")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="maws-bench-keys-")
    try:
        t0 = time.perf_counter()
        write_units(work, args.units, args.unit_rows, args.buckets)
        print(f"{args.units} unit spills of {args.unit_rows:,} rows over {args.buckets:,} buckets written in "
              f"{time.perf_counter() - t0:.1f} s")
        starts = tuple(u * args.unit_rows for u in range(args.units))
        sample = list(range(0, args.buckets, max(1, args.buckets // args.sample)))[:args.sample]
        time_keys(work, args.units, starts, sample, 1)  # warm: the page cache, this process's imports
        plain_s, plain = time_keys(work, args.units, starts, sample, 1)
        group = args.group or textpass.spill_group([args.unit_rows] * args.units, args.buckets)
        if group == 1:
            raise SystemExit(f"{args.units} x {args.buckets} reads <= MERGE_MIN_READS "
                             f"({textpass.MERGE_MIN_READS:,}): the build would not merge; take more units or buckets")
        t0 = time.perf_counter()
        for task in textpass.merge_tasks(work, args.units, args.buckets, group):
            textpass.merge_spills(task)
        merge_s = time.perf_counter() - t0
        merged_s, merged = time_keys(work, args.units, starts, sample, group)
        assert merged == plain, "the keys round decided differently from the merged spills"
        files = -(-args.units // group)
        plain_total, merged_total = plain_s * args.buckets, merged_s * args.buckets + merge_s
        print(f"unit spills:  {args.units * args.buckets:>12,} reads, {plain_s * 1e3:7.1f} ms per bucket, "
              f"round {plain_total:7.1f} s")
        print(f"merged (x{group}): {files * args.buckets:>11,} reads, {merged_s * 1e3:7.1f} ms per bucket, "
              f"round {merged_s * args.buckets:7.1f} s + merge {merge_s:.1f} s ({files} tasks) = {merged_total:.1f} s")
        print(f"keys round with the merge: {plain_total / merged_total:.1f}x faster (wall, one process)")
    finally:
        if storage.is_remote(work):
            fs, path = storage.filesystem(work)
            fs.rm(path, recursive=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
