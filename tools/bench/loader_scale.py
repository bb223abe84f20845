"""Loader startup, first-batch latency and memory at 10^5, 10^6 and 10^7 samples (rank 0 of world 8).

The builds are made by HARD-LINKING the files of one real shard (its .tar, .idx, .samples.npz and stats
.json, from the loader benchmark's build of the Instagram photos: 500 real JPEGs at shorter side 256)
under many shard names, with a manifest listing all of them and the real vocabulary.tsv. So the
metadata the loader reads at startup (manifest, vocabulary, one stat per tar) has the size of a real
build of that many samples, while the disk holds one shard; the page cache holds it too, so reads
are warm (as on the issue's measurements).

Each size runs in a fresh process: `import torch, maws_data.loader` first (its RSS is the baseline),
then `build_loader` (startup), then the first batch (the epoch plan, one window of sidecars, 256
decoded images), then a resumed loader positioned half way through the epoch and its first batch.
Memory (in-process, num_workers=0 by default: everything the loader holds is in this process):
  loader MB     peak of tracemalloc over those steps (a second run): the loader's own memory (index,
                plans, sidecars, Python objects; numpy buffers included), not torch's output batches
  startup RSS   RSS growth of build_loader alone
  peak RSS      peak RSS above the imports, output batches included (3 reused 154 MB buffers at batch 256)
With --workers W the workers' unique memory (USS) at the first batch is printed as well.

    uv run python tools/bench/loader_scale.py                    # 1e5 1e6 1e7, task wsp, sqrt resampling
    uv run python tools/bench/loader_scale.py --sizes 100000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_BUILD = Path("/tmp/maws-bench-loader/build-256")  # tools/bench/loader.py's build (made there if absent)


def make_build(source: Path, out: Path, n_samples: int) -> Path:
    """out/: manifest + vocabulary + ceil(n / shard size) hard links of source's first shard."""
    manifest = json.loads((source / "manifest.json").read_text())
    first = manifest["shards"][0]
    per = first["samples"]
    n_shards = -(-n_samples // per)
    if (out / "manifest.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "shards").mkdir(parents=True)
    stem = source / first["name"].removesuffix(".tar")
    suffixes = [".tar", ".idx", ".samples.npz", ".json"]
    entries = []
    for s in range(n_shards):
        for suf in suffixes:
            os.link(str(stem) + suf, tmp / "shards" / f"shard-{s:06d}{suf}")
        entries.append({**first, "name": f"shards/shard-{s:06d}.tar"})
    shutil.copy(source / "vocabulary.tsv", tmp / "vocabulary.tsv")
    written = per * n_shards
    labeled = first["labeled"] * n_shards
    manifest.update(shards=entries, counts={"rows": written, "written": written, "labeled": labeled,
                                            "unlabeled": written - labeled, "skipped": {}})
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    os.replace(tmp, out)
    return out


def measure(build: str, args) -> dict:
    """In this (fresh) process: startup, first batch, resumed first batch; memory above the imports.

    --traced: the same steps under tracemalloc (numpy registers its buffers with it), whose peak is the
    loader's own memory: index, plans, sidecars, Python objects. Not traced: torch's output batches
    (3 reused buffers of batch x 3 x 224 x 224 float32, 154 MB each at batch 256: O(batch), not O(build)),
    which the RSS figure includes."""
    import tracemalloc

    import psutil
    import torch
    from maws_data.loader import LoaderConfig, build_loader

    torch.set_num_threads(1)
    proc = psutil.Process()
    base = proc.memory_info().rss
    if args.traced:
        tracemalloc.start()
    cfg = LoaderConfig(shards=build, task=args.task, batch_size=args.batch_size, image_size=224,
                       resample="sqrt" if args.task == "wsp" else "none", backend="webdataset",
                       num_workers=args.workers)
    t0 = time.perf_counter()
    loader = build_loader(cfg, rank=0, world_size=8)
    startup = time.perf_counter() - t0
    startup_rss = proc.memory_info().rss - base
    t0 = time.perf_counter()
    it = iter(loader)
    x, y = next(it)
    first = time.perf_counter() - t0
    workers_uss = [c.memory_full_info().uss for c in proc.children()]
    del x, y, it
    state = {**loader.state_dict(), "batches": loader.batches_per_epoch // 2}
    t0 = time.perf_counter()
    resumed = build_loader(cfg, rank=0, world_size=8)
    resumed.load_state_dict(state)
    _x, _ = next(iter(resumed))
    resume_first = time.perf_counter() - t0
    # the in-process output buffers are numpy arrays too (BufferPool): O(batch), counted apart
    buffers = sum(a.nbytes for lo in (loader, resumed) if lo._pool for a in lo._pool.arrays.values())
    traced = tracemalloc.get_traced_memory()[1] - buffers if args.traced else 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"samples": int(loader.index.samples.sum()), "shards": len(loader.index), "startup_s": startup,
            "first_batch_s": first, "resumed_first_batch_s": resume_first, "batches_per_epoch": len(loader),
            "startup_rss_mb": startup_rss / 2**20, "loader_traced_peak_mb": traced / 2**20,
            "rss_peak_mb": (peak - base) / 2**20, "workers_uss_mb": [u / 2**20 for u in workers_uss],
            "load": os.getloadavg()}


def run(build: Path, args, traced: bool) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(build), "--task", args.task, "--batch-size",
           str(args.batch_size), "--workers", str(args.workers), *(["--traced"] if traced else [])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10**5, 10**6, 10**7])
    p.add_argument("--work", type=Path, default=Path("/tmp/maws-bench-scale"))
    p.add_argument("--task", default="wsp", choices=["mae", "wsp", "eval"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure this build in this process
    p.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return
    if not (SOURCE_BUILD / "manifest.json").exists():
        sys.path.insert(0, str(ROOT / "tools" / "bench"))
        import loader as bench_loader  # the loader benchmark's real build of the Instagram photos

        bench_loader.build_shards(SOURCE_BUILD, image_size=256, processes=2)
    results = []
    print(f"task {args.task}{' (sqrt resampling)' if args.task == 'wsp' else ''}, rank 0 of world 8, batch "
          f"{args.batch_size} at 224 px, {args.workers} workers; builds are hard links of one real shard "
          f"({SOURCE_BUILD}); load average {os.getloadavg()}", flush=True)
    print(f"{'samples':>10s} {'shards':>7s} {'startup':>8s} {'1st batch':>9s} {'resumed 1st':>11s} "
          f"{'loader MB':>9s} {'startup RSS':>11s} {'peak RSS':>9s}  workers USS MB", flush=True)
    for n in args.sizes:
        build = make_build(SOURCE_BUILD, args.work / f"n{n}", n)
        r = run(build, args, traced=False)
        r["loader_traced_peak_mb"] = run(build, args, traced=True)["loader_traced_peak_mb"]
        results.append(r)
        print(f"{r['samples']:>10d} {r['shards']:>7d} {r['startup_s']:>7.2f}s {r['first_batch_s']:>8.2f}s "
              f"{r['resumed_first_batch_s']:>10.2f}s {r['loader_traced_peak_mb']:>9.1f} {r['startup_rss_mb']:>11.1f} "
              f"{r['rss_peak_mb']:>9.1f}  {', '.join(f'{u:.0f}' for u in r['workers_uss_mb']) or '-'}"
              f"   (load {r['load'][0]:.1f})", flush=True)
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        print(f"growth {lo['samples']:.0e} -> {hi['samples']:.0e}: startup {hi['startup_s'] / lo['startup_s']:.2f}x, "
              f"loader memory {hi['loader_traced_peak_mb'] / max(lo['loader_traced_peak_mb'], 1e-9):.2f}x", flush=True)
    print(f"load average after: {os.getloadavg()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
