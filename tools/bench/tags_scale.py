"""Memory per process against the number of DISTINCT hashtags (the text pass), at a fixed row count.

`build_scale.py` grows the rows; its sources cycle through ~102k real captions, so every build there
has the same 28,319 distinct tags. A real corpus at 10^9 rows has millions. The driver holds
O(distinct tags) by design (their counts, the mapping), and a worker holds the shipped mapping
cache and its parsing tables; this bench measures what one more distinct tag costs each.

It writes sources of --rows rows (the build_scale captions, 25k rows per parquet file) where each
row also gets one synthetic tag (`#qx` + 4 letters) out of P distinct ones, for each P of
--extra-tags, and runs the CLI's text pass on each with 2 processes: cold (an empty mapping cache:
the new tags are mapped, by the mapping round on the workers past `textpass.MAP_MIN_TAGS`), then
warm (the cache holds every tag: the scan counts). It prints the peak RSS of the driver and of the
largest worker, and the bytes per extra distinct tag between the smallest and the largest P.

    NLTK_DATA=../shared/data/nltk_data uv run --with psutil python tools/bench/tags_scale.py
    ... tags_scale.py --rows 1e6 --extra-tags 0,100000,300000 --work /tmp/tags
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_scale import captions, run_build  # the same captions and the same measured CLI run

ROWS_PER_FILE = 25_000


def synthesize(out: Path, rows: int, extra: int) -> int:
    """The source for one P (kept across runs in --work); returns its files' count."""
    done = out / "done"
    if done.is_file() and done.read_text() == f"{rows} {extra}":
        return len(list(out.glob("*.parquet")))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    caps = captions()
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    for f, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        idx = np.arange(start, min(start + ROWS_PER_FILE, rows))
        text = caps.gather(idx % len(caps))
        if extra:
            k = (idx * 7919) % extra  # spread: every P-th row repeats a tag
            tags = ["".join(letters[(k // 26**j) % 26]) for j in range(4)]
            text = text + pl.Series([" #qx" + "".join(t) for t in zip(*tags)])
        pl.DataFrame({"key": [f"k{i}" for i in idx], "image": [f"missing/{i}.jpg" for i in idx],
                      "caption": text}).write_parquet(out / f"part-{f:05d}.parquet")
    done.write_text(f"{rows} {extra}")
    return len(list(out.glob("*.parquet")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=float, default=1e6)
    ap.add_argument("--extra-tags", default="0,300000", help="comma-separated numbers of synthetic distinct tags")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="keep sources here (default: a temp dir, removed)")
    args = ap.parse_args()
    rows, sizes = int(args.rows), [int(float(x)) for x in args.extra_tags.split(",")]
    if max(sizes) >= 26**4:
        sys.exit(f"--extra-tags: at most {26**4 - 1} (4 letters)")
    work = args.work or Path(tempfile.mkdtemp(prefix="maws-bench-tags-"))
    results = []
    try:
        for extra in sizes:
            src = work / f"src-{rows}-{extra}"
            files = synthesize(src, rows, extra)
            cache = work / f"cache-{rows}-{extra}"
            shutil.rmtree(cache, ignore_errors=True)
            for label in ("cold", "warm"):
                r = run_build(src, work / "out", args.processes, cache, text_only=True)
                results.append((extra, label, r))
                print(f"{rows:,} rows ({files} files), +{extra:,} distinct tags, {label}: {r.tags:,} tags, text pass "
                      f"{r.text_s:.1f} s, driver {r.driver_mb:.0f} MB, largest worker {r.worker_mb:.0f} MB", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| extra distinct tags | distinct tags | run | text pass s | driver RSS MB | largest worker RSS MB |")
    print("|---:|---:|---|---:|---:|---:|")
    for extra, label, r in results:
        print(f"| {extra:,} | {r.tags:,} | {label} | {r.text_s:.1f} | {r.driver_mb:.0f} | {r.worker_mb:.0f} |")
    for label in ("cold", "warm"):
        runs = {e: r for e, lab, r in results if lab == label}
        lo, hi = runs[min(sizes)], runs[max(sizes)]
        if hi.tags > lo.tags:
            per = 2**20 / (hi.tags - lo.tags)
            print(f"{label}: per extra distinct tag, driver {per * (hi.driver_mb - lo.driver_mb):.0f} B, "
                  f"largest worker {per * (hi.worker_mb - lo.worker_mb):.0f} B")
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
