"""Build throughput (images/s): `maws_data.build` against img2dataset, same images, same run.

Both tools download the same Instagram photos from one HTTP server on 127.0.0.1 (a separate process,
HTTP/1.1 keep-alive), resize the shorter side to --image-size (never upscaling), re-encode JPEG q90
and write WebDataset tars, with the same number of worker processes. Wall time is measured around
each tool's whole command (start-up included), after an untimed warm-up run of each that loads
the Python environments; images/s counts the images each tool actually wrote.

    uv run python tools/bench/build.py                         # 2 processes, URLs x4 (9,044 images)
    uv run python tools/bench/build.py --processes 4 --repeat 8
    uv run python tools/bench/build.py --skip-img2dataset      # our side only

img2dataset runs isolated through `uvx --from img2dataset img2dataset` (PyPI, its own deps).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "instagram"


# --------------------------------------------------------------------------- HTTP server


class _QuietHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for clients that want it (urllib sends Connection: close)
    # TCP_NODELAY, as production servers set it (nginx tcp_nodelay on): without it, headers and body
    # go out as two writes and a reused connection waits ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass


def _serve(folder: str, port_queue) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=folder))
    server.daemon_threads = True
    port_queue.put(server.server_address[1])
    server.serve_forever()


def start_server(folder: Path) -> tuple[mp.Process, str]:
    """Serve `folder` from a separate process so its CPU use does not share a GIL with either tool."""
    q = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_serve, args=(str(folder), q), daemon=True)
    proc.start()
    return proc, f"http://127.0.0.1:{q.get(timeout=60)}"


# --------------------------------------------------------------------------- inputs


def make_inputs(data: Path, base_url: str, repeat: int, work: Path, *, limit: int | None = None
                ) -> tuple[Path, Path, int]:
    """A URL list for img2dataset and a captions parquet (key, image=URL, caption) for us.

    --repeat replicates every image with a distinct query string (?r=i) so that neither tool can
    deduplicate, and the run lasts long enough to measure.
    """
    df = pl.read_parquet(data / "captions.parquet").select("key", "image", "caption")
    df = df if limit is None else df.head(limit)
    reps = []
    for r in range(repeat):
        reps.append(df.select(
            (pl.col("key") + f"-r{r}").alias("key"),
            (pl.lit(base_url + "/") + pl.col("image") + f"?r={r}").alias("image"),
            pl.col("caption"),
        ))
    table = pl.concat(reps)
    urls = work / "urls.parquet"
    table.select(pl.col("image").alias("url"), "caption").write_parquet(urls)
    source = work / "captions_urls.parquet"
    table.write_parquet(source)
    return urls, source, table.height


# --------------------------------------------------------------------------- img2dataset


def img2dataset_cmd(urls: Path, out: Path, args) -> list[str]:
    return [
        "uvx", "--from", "img2dataset", "img2dataset",
        f"--url_list={urls}", "--input_format=parquet", "--url_col=url", "--caption_col=caption",
        "--output_format=webdataset", f"--output_folder={out}",
        f"--processes_count={args.processes}", f"--thread_count={args.threads}",
        f"--image_size={args.image_size}", "--resize_mode=keep_ratio", "--resize_only_if_bigger=True",
        "--encode_quality=90", "--encode_format=jpg", "--number_sample_per_shard=1000",
        "--timeout=10", "--retries=2", "--compute_hash=None", "--enable_wandb=False",
        "--distributor=multiprocessing",
    ]


def run_img2dataset(urls: Path, out: Path, args) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    cmd = img2dataset_cmd(urls, out, args)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return seconds, ok


# --------------------------------------------------------------------------- ours


OUR_DRIVER = r"""
import json, sys, time
from maws_data.build import build, BuildConfig
kwargs = json.loads(sys.argv[1])
t0 = time.perf_counter()
result = build(BuildConfig(**kwargs))
print(json.dumps({"seconds_in_process": time.perf_counter() - t0}))
"""


def our_kwargs(source: Path, out: Path, args) -> dict:
    """BuildConfig fields for maws_data.build (see packages/data/src/maws_data/build.py)."""
    return {"source": str(source), "out": str(out), "image_size": args.image_size, "jpeg_quality": 90,
            "processes": args.processes, "shard_size": 1000, "decoder": args.decoder, "progress": False,
            "timeout_s": 10.0, "retries": 2}


def run_ours(source: Path, out: Path, args) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    env.setdefault("NLTK_DATA", str(ROOT.parent / "shared" / "data" / "nltk_data"))
    cmd = [sys.executable, "-c", OUR_DRIVER, json.dumps(our_kwargs(source, out, args))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"maws_data.build failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return seconds, _written(manifest)


def _written(manifest: dict) -> int:
    return manifest["counts"]["written"]


# --------------------------------------------------------------------------- images stage only


def _images_chunk(urls: list[str], image_size: int, threads: int) -> int:
    from maws_data.images import ImageConfig, SkipSample, load_and_process_many

    cfg = ImageConfig(image_size=image_size, decoder="pil")
    results = load_and_process_many([(u, ".") for u in urls], cfg, threads=threads)
    return sum(not isinstance(r, SkipSample) for r in results)


def run_images_stage(source: Path, args) -> tuple[float, int]:
    """maws_data.images alone (download + decode + resize + encode, no tar writing, no labels):
    the ceiling the builder's image work can reach with this many processes."""
    urls = pl.read_parquet(source)["image"].to_list()
    chunks = [urls[i::args.processes * 8] for i in range(args.processes * 8)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.processes) as pool:
        ok = sum(pool.starmap(_images_chunk, [(c, args.image_size, args.our_threads) for c in chunks]))
    return time.perf_counter() - t0, ok


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with captions.parquet and images/")
    ap.add_argument("--processes", type=int, default=2, help="worker processes, both tools")
    ap.add_argument("--threads", type=int, default=32, help="img2dataset download threads per process")
    ap.add_argument("--our-threads", type=int, default=4, help="maws-data threads per process (images stage)")
    ap.add_argument("--decoder", default="pil", choices=["auto", "pil", "dali"], help="maws-data decoder")
    ap.add_argument("--image-size", type=int, default=256, help="shorter side after resize, both tools")
    ap.add_argument("--repeat", type=int, default=4, help="replicate the URL list this many times")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    ap.add_argument("--skip-img2dataset", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--images-stage", action="store_true",
                    help="also time maws_data.images alone (download+decode+resize+encode) in a process pool")
    args = ap.parse_args()
    if not (args.data / "captions.parquet").exists():
        sys.exit(f"no captions.parquet in {args.data} (pass --data)")

    work = args.work or Path(tempfile.mkdtemp(prefix="maws-bench-build-"))
    work.mkdir(parents=True, exist_ok=True)
    server, base_url = start_server(args.data)
    try:
        urls, source, n = make_inputs(args.data, base_url, args.repeat, work)
        (work / "warm").mkdir(exist_ok=True)
        warm_urls, warm_source, _ = make_inputs(args.data, base_url, 1, work / "warm", limit=100)
        print(f"{n} images served from {base_url}; {args.processes} processes; shorter side {args.image_size}")
        results = {}
        if not args.skip_img2dataset:
            run_img2dataset(warm_urls, work / "i2d-warm", args)  # untimed: uvx env, imports, page cache
            results["img2dataset"] = run_img2dataset(urls, work / "i2d", args)
        if not args.skip_ours:
            run_ours(warm_source, work / "ours-warm", args)
            results["maws-data build"] = run_ours(source, work / "ours", args)
        if args.images_stage:
            results["images stage only"] = run_images_stage(source, args)
    finally:
        server.kill()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    for name, (seconds, ok) in results.items():
        print(f"{name:>18}: {ok:6d} images in {seconds:7.2f} s = {ok / seconds:8.1f} images/s")
    if len(results) == 2:
        (t_i2d, n_i2d), (t_us, n_us) = results["img2dataset"], results["maws-data build"]
        ratio = (n_us / t_us) / (n_i2d / t_i2d)
        print(f"ratio maws-data / img2dataset: {ratio:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
