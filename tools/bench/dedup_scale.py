"""Scale of the bounded-memory dedup passes (maws_data.dedup.table) at 10^5 - 10^7 synthetic hashes.

    uv run python tools/bench/dedup_scale.py                          # exact + near (k=2), 1e5 1e6 1e7
    uv run python tools/bench/dedup_scale.py --modes near --threshold 4     # the k=4 plan (70 tables)

For each N a fresh child process writes N rows as unit files of --unit-rows rows (synthetic phashes
with 32 bits set, as real pHashes have; random sha256 prefixes; planted duplicates: 0.5% exact
copies of a row up to one unit earlier, 1% near copies with 1..k bits swapped), then runs
`dedup(mode=...)` on them. Each child generates one unit at a time, so the whole table is never in
its memory; its peak RSS and the time per hash of the dedup pass alone (wall, and the process's CPU
time: on a shared machine, or when the spills outgrow the page cache, wall time also measures the
neighbours and the disk) are printed, with the number
of decisions (which must equal the planted duplicates that are not themselves removed).

Near uses one fixed block plan for every N (--blocks, default: mih.plan_blocks(k, 10^9), the plan a
10^9 build would use), so the per-hash cost is comparable across N; spills and partitions hold
--records records each at every N, so each task's memory is the same at every N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def random_phash(rng: np.random.Generator, n: int) -> np.ndarray:
    """n hashes with exactly 32 of 64 bits set (pHash thresholds at the median)."""
    bits = np.argsort(rng.random((n, 64)), axis=1) < 32
    return (np.packbits(bits, axis=1).view(">u8").reshape(n)).astype(np.uint64)


def swap_bits(rng: np.random.Generator, h: np.ndarray, swaps: np.ndarray) -> np.ndarray:
    """Swap `swaps[i]` set bits with unset bits of h[i]: distance 2 * swaps[i], still 32 bits set."""
    out = h.copy()
    for i in range(len(h)):
        bits = np.unpackbits(np.array([h[i]], ">u8").view(np.uint8))
        ones, zeros = np.flatnonzero(bits), np.flatnonzero(bits == 0)
        s = int(swaps[i])
        bits[rng.choice(ones, s, replace=False)] = 0
        bits[rng.choice(zeros, s, replace=False)] = 1
        out[i] = np.packbits(bits).view(">u8")[0]
    return out


def child(args: argparse.Namespace) -> None:
    from maws_data.dedup.table import dedup, write_unit

    rng = np.random.default_rng(args.seed)
    table = Path(args.dir)
    t0 = time.perf_counter()
    prev_ph = prev_sha = None
    planted = {"exact": 0, "near": 0}
    for u, start in enumerate(range(0, args.n, args.unit_rows)):
        n = min(args.unit_rows, args.n - start)
        rows = np.arange(start, start + n, dtype=np.int64)
        ph, sha = random_phash(rng, n), rng.integers(0, 2**63, (n, 2), dtype=np.uint64)
        pool_ph = ph if prev_ph is None else np.concatenate([prev_ph, ph])
        pool_sha = sha if prev_sha is None else np.concatenate([prev_sha, sha])
        off = 0 if prev_ph is None else len(prev_ph)
        kind = rng.random(n)
        for name, sel in (("exact", kind < 0.005), ("near", (kind >= 0.005) & (kind < 0.015))):
            j = np.flatnonzero(sel)
            j = j[off + j > 0]
            src = (rng.random(len(j)) * (off + j)).astype(np.int64)  # any earlier row of this or the last unit
            if name == "exact":
                ph[j], sha[j] = pool_ph[src], pool_sha[src]
            else:
                ph[j] = swap_bits(rng, pool_ph[src], rng.integers(1, args.threshold // 2 + 1, len(j)))
            planted[name] += len(j)
        keys = np.char.add(b"r", rows.astype("S12"))
        write_unit(table, f"u{u:06d}", rows=rows, keys=keys, sha256=sha, phash=ph)
        prev_ph, prev_sha = ph, sha
    t_write = time.perf_counter() - t0
    rss_write = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del prev_ph, prev_sha, pool_ph, pool_sha
    t1 = time.perf_counter()
    cpu0 = time.process_time()
    d = dedup(table, mode=args.mode, threshold=args.threshold, blocks=args.blocks or None,
              spill_records=args.records, partition_records=args.records)
    t_dedup = time.perf_counter() - t1
    cpu = time.process_time() - cpu0  # this process's user + system time: what the load average does not stretch
    print(json.dumps({"n": args.n, "mode": args.mode, "threshold": args.threshold, "write_s": t_write,
                      "dedup_s": t_dedup, "us_per_hash": 1e6 * t_dedup / args.n,
                      "cpu_us_per_hash": 1e6 * cpu / args.n,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_rss_mb_writing": rss_write, "decisions": d.counts(), "planted": planted,
                      "spill_bytes": sum(p.stat().st_size for p in (table / "spills").glob("*.npy")),
                      "load": os.getloadavg()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--modes", nargs="+", default=["exact", "near"])
    ap.add_argument("--threshold", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=0, help="near: multi-index blocks (0 = the plan for 10^9)")
    ap.add_argument("--unit-rows", type=int, default=100_000)
    ap.add_argument("--records", type=int, default=1 << 20,
                    help="records per spill and per partition (sets the memory of every task)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.n:
        return child(args)
    from maws_data.dedup.mih import plan_blocks, table_masks

    blocks = args.blocks or plan_blocks(args.threshold, 10**9)
    print(f"near plan: k={args.threshold}, {blocks} blocks, {len(table_masks(args.threshold, blocks))} tables; "
          f"load {os.getloadavg()}")
    for mode in args.modes:
        for n in args.sizes:
            tmp = tempfile.mkdtemp(prefix="dedup_scale_")
            try:
                cmd = [sys.executable, __file__, "--n", str(n), "--mode", mode, "--dir", tmp, "--threshold",
                       str(args.threshold), "--blocks", str(blocks), "--unit-rows", str(args.unit_rows),
                       "--records", str(args.records),
                       "--seed", str(args.seed)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"{mode:5s} N={n:>10,}  dedup {r['dedup_s']:7.1f} s = {r['us_per_hash']:6.2f} us/hash "
                      f"(CPU {r['cpu_us_per_hash']:6.2f} us/hash)  "
                      f"peak RSS {r['peak_rss_mb']:6.0f} MB (writing the units {r['peak_rss_mb_writing']:4.0f})  spill {r['spill_bytes'] / 2**20:7.0f} MiB  "
                      f"decisions {r['decisions']} planted {r['planted']}  load {r['load'][0]:.2f}", flush=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
