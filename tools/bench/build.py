"""Build throughput (images/s): `maws_data.build` against img2dataset, same images, same run.

Both tools download the same Instagram photos from one HTTP server on 127.0.0.1 (a separate process,
HTTP/1.1 keep-alive, TCP_NODELAY; by default a lean asyncio server with the files cached in memory,
~35 us of CPU per request, standing in for nginx or a CDN, as it shares the machine's cores with
the tools; `--server stdlib` uses Python's http.server, ~100 us per request), resize the shorter
side to --image-size (never upscaling), re-encode JPEG q90 and write WebDataset tars of 1000 samples, with the same number of worker
processes. Each tool's whole command is timed (start-up included) after an untimed warm-up run on
100 URLs; images/s counts the images each tool actually wrote. Besides wall time, the CPU time of
each tool (all its processes) and of the server is measured: on a shared machine, CPU ms per image
is the steadier measure of how much work each tool needs.

    uv run python tools/bench/build.py                         # 2 processes, URLs x4 (9,044 images)
    uv run python tools/bench/build.py --processes 4 --repeat 8 --images-stage
    uv run python tools/bench/build.py --skip-img2dataset      # our side only
    uv run python tools/bench/build.py --skip-img2dataset --dedup-cost   # + what dedup costs per image

img2dataset runs isolated through `uvx --from img2dataset img2dataset` (PyPI, its own deps).

The floor, measured in the same run: bare Pillow(-SIMD) decode (with JPEG draft) + resize + JPEG
encode of the same image files, already in memory, in a tight loop on --processes processes: what
any builder must spend per image. `ours / floor` is the builder's wall time per image over the
floor's. The gap is split by the other rows: `images stage only` adds the HTTP client and the
thread hand-offs to the floor; the build's image pass adds tar writing, JSON, the DALI index,
the sidecar and the sha256 of every tar. `--files` times the build's image pass on the same images
read from local files instead of HTTP: the difference is the network (client, and on a small
machine the server's CPU, which shares the cores with the build).

The URL list repeats every photo --repeat times, so these runs use `--dedup none` (with the default
`exact`, 3 of 4 rows would be removed as duplicate_image and the tools would not write the same
images). `--dedup-cost` measures, in the same run, what deduplication costs per image (issue 12's
target: <= 10% of the image pass):
  - hashing: the floor loop again with sha256 of the source bytes + pHash of the resized image
    ("floor + hashes"); the difference in CPU per image, over the build image pass's CPU per image;
  - lookups: the build on the sample's distinct rows (--repeat 1: its own ~1% repeats, no copies
    made by the bench), --dedup none against --dedup near --decontaminate --eval, alternating,
    --dedup-runs times each, medians of the image pass (which then includes the eval lookups, the
    unit files, the dedup stage and the shard filtering); the difference in CPU per input row.
Building the eval index (once per build, before the text pass) is timed separately.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "instagram"
SHARD_SIZE = 1000


# --------------------------------------------------------------------------- HTTP server


class _QuietHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for clients that want it (urllib sends Connection: close)
    # TCP_NODELAY, as production servers set it (nginx tcp_nodelay on): without it, headers and body
    # go out as two writes and a reused connection waits ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that hangs up early (a timeout, a pool shutting down) is not news.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _StaticFiles(asyncio.Protocol):
    """A lean static file server (HTTP/1.1 keep-alive, files cached in memory), the stand-in for a
    production image host (nginx, a CDN): its CPU per request is a fraction of http.server's, which
    matters here because the server shares the build's two cores. GET only; 404 for anything else."""

    def __init__(self, root: Path, cache: dict[str, bytes | None]):
        self.root, self.cache, self.buf = root, cache, b""

    def connection_made(self, transport):
        self.transport = transport  # asyncio sets TCP_NODELAY on TCP transports

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            close = parts[-1] == b"HTTP/1.0" or any(
                line.lower().startswith(b"connection:") and b"close" in line.lower() for line in lines[1:])
            body = self._file(parts[1]) if len(parts) == 3 and parts[0] == b"GET" else None
            status = b"200 OK" if body is not None else b"404 Not Found"
            body = body if body is not None else b"not found"
            self.transport.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n%s\r\n"
                                 % (status, len(body), b"Connection: close\r\n" if close else b"") + body)
            if close:
                self.transport.close()
                return

    def _file(self, target: bytes) -> bytes | None:
        path = urllib.parse.unquote(target.split(b"?", 1)[0].decode("utf-8", "replace"))
        if path not in self.cache:
            file = (self.root / path.lstrip("/")).resolve()
            self.cache[path] = file.read_bytes() if file.is_file() and file.is_relative_to(self.root) else None
        return self.cache[path]


def _serve(folder: str, port_queue, kind: str = "lean") -> None:
    if kind == "stdlib":
        server = _Server(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=folder))
        port_queue.put(server.server_address[1])
        server.serve_forever()
        return
    root, cache = Path(folder).resolve(), {}
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(lambda: _StaticFiles(root, cache), "127.0.0.1", 0))
    port_queue.put(server.sockets[0].getsockname()[1])
    loop.run_forever()


def start_server(folder: Path, kind: str = "lean") -> tuple[mp.Process, str]:
    """Serve `folder` from a separate process so its CPU use does not share a GIL with either tool.
    kind: "lean" (_StaticFiles) or "stdlib" (http.server, ~100 us of CPU per request)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(str(folder), q, kind), daemon=True)
    proc.start()
    return proc, f"http://127.0.0.1:{q.get(timeout=60)}"


# --------------------------------------------------------------------------- inputs


def make_inputs(data: Path, base_url: str, repeat: int, work: Path, *, limit: int | None = None,
                files: bool = False) -> tuple[Path, Path, int]:
    """A URL parquet for img2dataset and a captions parquet (key, image=URL, caption) for us.

    --repeat replicates every image with a distinct query string (?r=i) so that neither tool can
    deduplicate, and the run lasts long enough to measure. `files`: image = the local file's path.
    """
    df = pl.read_parquet(data / "captions.parquet").select("key", "image", "caption")
    df = df if limit is None else df.head(limit)
    image = (pl.lit(str(data.absolute()) + "/") + pl.col("image")) if files else None
    table = pl.concat([df.select(
        (pl.col("key") + f"-r{r}").alias("key"),
        (image if files else pl.lit(base_url + "/") + pl.col("image") + f"?r={r}").alias("image"),
        pl.col("caption"),
    ) for r in range(repeat)])
    work.mkdir(parents=True, exist_ok=True)
    urls, source = work / "urls.parquet", work / "captions_urls.parquet"
    table.select(pl.col("image").alias("url"), "caption").write_parquet(urls)
    table.write_parquet(source)
    return urls, source, table.height


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    wall_s: float
    images: int
    cpu_s: float  # user+sys of the tool and all its processes
    server_cpu_s: float  # user+sys of the HTTP server while the tool ran

    @property
    def per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * (self.cpu_s + self.server_cpu_s) / max(self.images, 1)


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def _become_subreaper() -> None:
    """Orphans of our descendants become our children, so that their CPU counts when we reap them:
    the build's local workers are forked by a forkserver that nobody waits for (it exits just after
    the build's own process), so without this RUSAGE_CHILDREN would miss all of their CPU."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _children() -> list[str]:
    me = str(os.getpid())
    return [p for p in os.listdir("/proc") if p.isdigit() and _parent(p) == me]


def _reap_adopted(keep: set[int], timeout_s: float = 30.0) -> None:
    """Wait for every child of ours but `keep` (those we had before the command) to exit, and reap it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
        if not [p for p in _children() if int(p) not in keep]:
            return
        time.sleep(0.05)


def _parent(pid: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return None


def timed(cmd: list[str], *, server_pid: int, env: dict, cwd: Path | None = None
          ) -> tuple[float, float, float, str]:
    """Run `cmd`; (wall s, CPU s of it and its descendants, CPU s of the server meanwhile, stdout)."""
    _become_subreaper()
    # children we already had (the HTTP server, multiprocessing's resource tracker) live on
    already = {int(p) for p in _children()} | {server_pid}
    before, s0 = resource.getrusage(resource.RUSAGE_CHILDREN), _proc_cpu(server_pid)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd, check=False)
    wall = time.perf_counter() - t0
    _reap_adopted(already)
    after, s1 = resource.getrusage(resource.RUSAGE_CHILDREN), _proc_cpu(server_pid)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, s1 - s0, proc.stdout


# --------------------------------------------------------------------------- img2dataset


def img2dataset_cmd(urls: Path, out: Path, args) -> list[str]:
    return [
        "uvx", "--from", "img2dataset", "img2dataset",
        f"--url_list={urls}", "--input_format=parquet", "--url_col=url", "--caption_col=caption",
        "--output_format=webdataset", f"--output_folder={out}",
        f"--processes_count={args.processes}", f"--thread_count={args.threads}",
        f"--image_size={args.image_size}", "--resize_mode=keep_ratio", "--resize_only_if_bigger=True",
        "--encode_quality=90", "--encode_format=jpg", f"--number_sample_per_shard={SHARD_SIZE}",
        "--timeout=10", "--retries=2", "--compute_hash=None", "--enable_wandb=False",
        "--distributor=multiprocessing",
    ]


def run_img2dataset(urls: Path, out: Path, args, server_pid: int) -> Timing:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    wall, cpu, server, _ = timed(img2dataset_cmd(urls, out, args), server_pid=server_pid, env=env)
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return Timing(wall, ok, cpu, server)


# --------------------------------------------------------------------------- ours


OUR_DRIVER = r"""
import json, resource, sys
from maws_data.build import build, BuildConfig
build(BuildConfig(**json.loads(sys.argv[1])))
cpu = lambda r: r.ru_utime + r.ru_stime
# the pool's worker processes do the image pass (run_shard); this process the driver's part
print(json.dumps({"main_cpu_s": cpu(resource.getrusage(resource.RUSAGE_SELF))}))
"""


def our_kwargs(source: Path, out: Path, args, **kw) -> dict:
    """BuildConfig fields for maws_data.build (see packages/data/src/maws_data/build.py)."""
    return {"source": str(source), "out": str(out), "image_size": args.image_size, "jpeg_quality": 90,
            "processes": args.processes, "shard_size": SHARD_SIZE, "decoder": args.decoder, "progress": False,
            "timeout_s": 10.0, "retries": 2, "dedup": "none", "threads": args.build_threads, **kw}


def run_ours(source: Path, out: Path, args, server_pid: int, **kw) -> tuple[Timing, float, Timing]:
    """Whole build in a fresh process: its Timing, the seconds of its text pass, and the Timing of
    its image pass alone.

    The passes are read from the files' times: the text pass (start-up, reading, hashtags, WordNet,
    vocabulary) ends when hashtag_map.tsv is written; the image pass (shards, DALI indexes,
    skipped.jsonl) ends with manifest.json. The image pass's CPU is its worker processes' CPU.
    """
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    env.setdefault("NLTK_DATA", str(ROOT.parent / "shared" / "data" / "nltk_data"))
    cmd = [sys.executable, "-c", OUR_DRIVER, json.dumps(our_kwargs(source, out, args, **kw))]
    started = time.time()
    wall, cpu, server, stdout = timed(cmd, server_pid=server_pid, env=env, cwd=ROOT)
    manifest = json.loads((out / "manifest.json").read_text())
    written = manifest["counts"]["written"]
    text_done = (out / "hashtag_map.tsv").stat().st_mtime
    image_wall = (out / "manifest.json").stat().st_mtime - text_done
    # the workers are the driver's grandchildren (forked by the runner's forkserver), so their CPU is
    # the whole tree's (timed) but the driver's own
    workers_cpu = cpu - json.loads(stdout.strip().splitlines()[-1])["main_cpu_s"]
    # all server CPU belongs to the image pass: the text pass downloads nothing
    return Timing(wall, written, cpu, server), text_done - started, Timing(image_wall, written, workers_cpu, server)


# --------------------------------------------------------------------------- images stage only


STAGE_DRIVER = r"""
import multiprocessing as mp, sys
from pathlib import Path
import polars as pl
sys.path.insert(0, "tools/bench")
from build import images_chunk
if __name__ == "__main__":
    source, procs, size, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    urls = pl.read_parquet(source)["image"].to_list()
    chunks = [urls[i::procs * 8] for i in range(procs * 8)]
    with mp.get_context("spawn").Pool(procs) as pool:
        ok = sum(pool.starmap(images_chunk, [(c, size, threads) for c in chunks]))
    source.with_suffix(".stage").write_text(str(ok))
"""


def images_chunk(urls: list[str], image_size: int, threads: int) -> int:
    """Download + decode + resize + encode (no hashes, tar, labels): loads on `threads` threads,
    decoding on one, as the builder does."""
    from maws_data.images import ImageConfig, SkipSample, load_and_process_many

    cfg = ImageConfig(image_size=image_size, decoder="pil")
    results = load_and_process_many([(u, ".") for u in urls], cfg, threads=threads, pipelined=True)  # as the builder
    return sum(not isinstance(r, SkipSample) for r in results)


def run_images_stage(source: Path, args, server_pid: int) -> Timing:
    """maws_data.images alone (download + decode + resize + encode; no tar, no labels) in a pool of
    --processes processes with --our-threads threads each: the ceiling for the builder's image pass."""
    cmd = [sys.executable, "-c", STAGE_DRIVER, str(source), str(args.processes), str(args.image_size),
           str(args.our_threads)]
    wall, cpu, server, _ = timed(cmd, server_pid=server_pid, env=dict(os.environ), cwd=ROOT)
    return Timing(wall, int(source.with_suffix(".stage").read_text()), cpu, server)


# --------------------------------------------------------------------------- the floor


FLOOR_DRIVER = r"""
import multiprocessing as mp, sys, json
sys.path.insert(0, "tools/bench")
from build import floor_chunk
if __name__ == "__main__":
    paths, procs, size = json.loads(open(sys.argv[1]).read()), int(sys.argv[2]), int(sys.argv[3])
    hashes = sys.argv[4] == "1"
    chunks = [paths[i::procs] for i in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        print(json.dumps(pool.starmap(floor_chunk, [(c, size, hashes) for c in chunks])))
"""


def floor_chunk(paths: list[str], image_size: int, hashes: bool = False) -> tuple[int, float, float, float]:
    """(images, loop wall s, loop CPU s, hashing CPU s): draft decode + resize + encode, bytes already in
    memory; with `hashes`, also sha256 of the bytes and pHash of the resized image (what the builder
    adds), their CPU time measured around the calls (a difference of two loops drowns in the noise)."""
    import io

    from maws_data.dedup.hashes import content_hash, phash
    from PIL import Image

    datas = [Path(p).read_bytes() for p in paths]
    hash_cpu = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for data in datas:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        scale = image_size / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1 else (w, h)
        im.draft("RGB", size)
        im = im.convert("RGB")
        if im.size != size:
            im = im.resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90, subsampling=2)
        if hashes:
            h0 = time.thread_time()
            content_hash(data)
            phash(im)
            hash_cpu += time.thread_time() - h0
    return len(datas), time.perf_counter() - t0, time.process_time() - c0, hash_cpu


def run_floor(data: Path, args, repeat: int, work: Path, *, hashes: bool = False) -> Timing:
    """The floor over the same images as the build (each file `repeat` times, as the URL list)."""
    files = [str(data / p) for p in pl.read_parquet(data / "captions.parquet")["image"]] * repeat
    listing = work / "floor_files.json"
    listing.write_text(json.dumps(files))
    cmd = [sys.executable, "-c", FLOOR_DRIVER, str(listing), str(args.processes), str(args.image_size),
           "1" if hashes else "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    parts = json.loads(proc.stdout.strip().splitlines()[-1])
    n = sum(p[0] for p in parts)
    # with hashes: server_cpu_s carries the hashing CPU alone (no server here)
    return Timing(max(p[1] for p in parts), n, sum(p[2] for p in parts), sum(p[3] for p in parts))


# --------------------------------------------------------------------------- dedup cost


def dedup_source(data: Path, train: Path, work: Path) -> tuple[Path, int]:
    """Distinct real photos from local files: the Instagram sample (with its captions) and every
    image under `train` (Imagenette train: captions cycled from the sample's)."""
    ig = pl.read_parquet(data / "captions.parquet").select("key", "image", "caption")
    ig = ig.with_columns((pl.lit(str(data.absolute()) + "/") + pl.col("image")).alias("image"))
    extra = sorted(train.rglob("*.JPEG"))
    captions = ig["caption"].to_list()
    more = pl.DataFrame({"key": [f"train-{p.stem}" for p in extra], "image": [str(p.absolute()) for p in extra],
                         "caption": [captions[i % len(captions)] for i in range(len(extra))]})
    table = pl.concat([ig, more])
    work.mkdir(parents=True, exist_ok=True)
    path = work / "dedup_source.parquet"
    table.write_parquet(path)
    return path, table.height


def run_dedup_cost(data: Path, args, server_pid: int, work: Path) -> dict:
    """Image pass per input row with --dedup none and with --dedup near --decontaminate, alternating."""
    import statistics

    source, rows = dedup_source(data, args.eval.parent / "train", work / "distinct")
    modes = {"none": {"dedup": "none"},
             "near + decontaminate": {"dedup": "near", "decontaminate": [str(args.eval)]}}
    runs: dict[str, list[Timing]] = {m: [] for m in modes}
    for r in range(args.dedup_runs):
        for mode, kw in modes.items():
            _, _, image_pass = run_ours(source, work / f"dedup-{r}", args, server_pid, **kw)
            image_pass.images = rows  # per input row: near writes a few images fewer
            runs[mode].append(image_pass)
            print(f"  dedup cost run {r + 1}/{args.dedup_runs} {mode:>20}: image pass {image_pass.wall_s:6.2f} s",
                  flush=True)
    removed = json.loads((work / f"dedup-{args.dedup_runs - 1}" / "manifest.json").read_text())["counts"]["skipped"]
    from maws_data.dedup.decontam import EvalIndex

    t0 = time.perf_counter()
    index = EvalIndex.build([args.eval])
    return {"rows": rows, "runs": args.dedup_runs, "eval_images": len(index), "removed": removed,
            "eval_index_s": time.perf_counter() - t0,
            **{m: Timing(statistics.median(t.wall_s for t in ts), rows, statistics.median(t.cpu_s for t in ts),
                         statistics.median(t.server_cpu_s for t in ts)) for m, ts in runs.items()}}


def report_dedup_cost(cost: dict, floor: Timing, hashed: Timing) -> None:
    none, near = cost["none"], cost["near + decontaminate"]
    hash_ms = 1000 * hashed.server_cpu_s / hashed.images  # run_floor(hashes=True): the hashing CPU
    hash_pct = 100 * hash_ms / floor.cpu_ms_per_image
    lookup_pct = 100 * (near.wall_s / none.wall_s - 1)
    print(f"dedup cost, {cost['rows']} distinct photos from local files (medians of {cost['runs']} runs each):")
    print(f"  hashing (sha256 + pHash): {1000 * hash_ms:.1f} us CPU/image = {hash_pct:.1f}% of the floor's "
          f"{floor.cpu_ms_per_image:.3f} ms (the image pass costs more than the floor: an upper bound)")
    print(f"  image pass, --dedup none: {none.wall_s:.2f} s; --dedup near --decontaminate: {near.wall_s:.2f} s "
          f"(removed: {json.dumps(cost['removed'], sort_keys=True)})")
    print(f"  lookups (eval match, unit files, dedup stage, shard filtering): {lookup_pct:+.1f}% image-pass wall")
    total = hash_pct + lookup_pct
    print(f"target: hashing + lookups <= 10% of the image pass per image -> {'MET' if total <= 10 else 'NOT met'} "
          f"({total:.1f}%)")
    print(f"  eval index: {cost['eval_images']} images hashed in {cost['eval_index_s']:.2f} s (once per build)")


# --------------------------------------------------------------------------- main


def report(results: dict[str, Timing], text_pass: float | None) -> None:
    print(f"{'':>18}  {'images':>6}  {'wall s':>7}  {'images/s':>8}  CPU ms/image (tool + server)")
    for name, t in results.items():
        print(f"{name:>18}  {t.images:6d}  {t.wall_s:7.2f}  {t.per_s:8.1f}  {t.cpu_ms_per_image:6.2f} "
              f"({1000 * t.cpu_s / max(t.images, 1):.2f} + {1000 * t.server_cpu_s / max(t.images, 1):.2f})")
    if text_pass is not None:
        print(f"{'build text pass':>18}  {'':6}  {text_pass:7.2f}  (start-up, hashtags, WordNet, vocabulary)")
    floor = results.get("floor (Pillow loop)")
    if floor:
        for name in ("maws-data build", "build image pass", "images stage only", "image pass (files)", "img2dataset"):
            t = results.get(name)
            if t:
                print(f"ratio {name:>17} / floor: {floor.per_s / t.per_s:5.2f}x wall per image, "
                      f"{t.cpu_ms_per_image / floor.cpu_ms_per_image:5.2f}x CPU per image")
        ours = results.get("build image pass")
        if ours:
            print(f"target: build image pass <= 1.3x the floor per image -> "
                  f"{'MET' if floor.per_s / ours.per_s <= 1.3 else 'NOT met'} ({floor.per_s / ours.per_s:.2f}x)")
    base = results.get("img2dataset")
    if not base:
        return
    for name, t in results.items():
        if name != "img2dataset":
            print(f"ratio {name:>17} / img2dataset: {t.per_s / base.per_s:5.2f}x images/s, "
                  f"{base.cpu_ms_per_image / t.cpu_ms_per_image:5.2f}x less CPU per image")
    ours = results.get("maws-data build")
    if ours:
        print(f"target: maws-data build >= 3x img2dataset images/s -> "
              f"{'MET' if ours.per_s >= 3 * base.per_s else 'NOT met'} ({ours.per_s / base.per_s:.2f}x)")


def report_pairs(pairs: list[dict[str, Timing]]) -> None:
    """Each image pass over the floor timed just before it; the median of those ratios."""
    import statistics

    for name in ("build image pass", "image pass (files)"):
        ratios = [p["floor (Pillow loop)"].per_s / p[name].per_s for p in pairs if name in p]
        if ratios:
            print(f"ratio {name:>17} / floor, median of {len(ratios)} alternating pairs: "
                  f"{statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})"
                  + (f" -> target <= 1.3x {'MET' if statistics.median(ratios) <= 1.3 else 'NOT met'}"
                     if name == "build image pass" else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with captions.parquet and images/")
    ap.add_argument("--processes", type=int, default=2, help="worker processes, both tools")
    ap.add_argument("--threads", type=int, default=32, help="img2dataset download threads per process")
    ap.add_argument("--our-threads", type=int, default=4, help="threads per process for --images-stage")
    ap.add_argument("--build-threads", type=int, default=16, help="maws-data build --threads (its default: 16)")
    ap.add_argument("--decoder", default="pil", choices=["auto", "pil", "dali"], help="maws-data decoder")
    ap.add_argument("--server", default="lean", choices=["lean", "stdlib"],
                    help="the image host: a lean asyncio server (default) or Python's http.server")
    ap.add_argument("--image-size", type=int, default=256, help="shorter side after resize, both tools")
    ap.add_argument("--repeat", type=int, default=4, help="replicate the URL list this many times")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    ap.add_argument("--skip-img2dataset", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--files", action="store_true",
                    help="also time the build reading the same images from local files (no HTTP)")
    ap.add_argument("--dedup-cost", action="store_true", help="also measure what --dedup near --decontaminate costs")
    ap.add_argument("--dedup-runs", type=int, default=3, help="builds per dedup mode for --dedup-cost")
    ap.add_argument("--eval", type=Path, default=ROOT.parent / "shared" / "data" / "imagenette" / "val",
                    help="eval set for --dedup-cost's --decontaminate")
    ap.add_argument("--pairs", type=int, default=1,
                    help="time the floor and our image pass(es) this many times, alternating; the ratio is the "
                         "median of each pair's (a shared VM's speed drifts by tens of %% within minutes)")
    ap.add_argument("--images-stage", action="store_true",
                    help="also time maws_data.images alone (download+decode+resize+encode) in a process pool")
    args = ap.parse_args()
    if not (args.data / "captions.parquet").exists():
        sys.exit(f"no captions.parquet in {args.data} (pass --data)")

    work = args.work or Path(tempfile.mkdtemp(prefix="maws-bench-build-"))
    server, base_url = start_server(args.data, args.server)
    results: dict[str, Timing] = {}
    pairs: list[dict[str, Timing]] = []  # --pairs: the runs after the first
    text_pass = None
    try:
        urls, source, n = make_inputs(args.data, base_url, args.repeat, work)
        warm_urls, warm_source, _ = make_inputs(args.data, base_url, 1, work / "warm", limit=100)
        print(f"{n} images served from {base_url}; {args.processes} processes; shorter side {args.image_size}",
              flush=True)
        if args.files:
            _, files_source, _ = make_inputs(args.data, base_url, args.repeat, work / "files", files=True)
        results["floor (Pillow loop)"] = run_floor(args.data, args, args.repeat, work)
        if not args.skip_img2dataset:
            run_img2dataset(warm_urls, work / "i2d-warm", args, server.pid)  # untimed: uvx env, imports
            results["img2dataset"] = run_img2dataset(urls, work / "i2d", args, server.pid)
        if not args.skip_ours:
            run_ours(warm_source, work / "ours-warm", args, server.pid)
            results["maws-data build"], text_pass, results["build image pass"] = run_ours(
                source, work / "ours", args, server.pid)
        if args.images_stage:
            results["images stage only"] = run_images_stage(source, args, server.pid)
        if args.files:
            _, _, results["image pass (files)"] = run_ours(files_source, work / "ours-files", args, server.pid)
        for _ in range(args.pairs - 1):  # more (floor, image pass) pairs, back to back
            pairs.append({"floor (Pillow loop)": run_floor(args.data, args, args.repeat, work)})
            if not args.skip_ours:
                pairs[-1]["build image pass"] = run_ours(source, work / "ours", args, server.pid)[2]
            if args.files:
                pairs[-1]["image pass (files)"] = run_ours(files_source, work / "ours-files", args, server.pid)[2]
            print("  pair " + ", ".join(f"{k} {t.wall_s:.2f} s" for k, t in pairs[-1].items()), flush=True)
        if args.dedup_cost:
            results["floor + hashes"] = run_floor(args.data, args, args.repeat, work, hashes=True)
            cost = run_dedup_cost(args.data, args, server.pid, work)
    finally:
        server.kill()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    hashed = results.pop("floor + hashes", None)
    report(results, text_pass)
    if pairs:
        report_pairs([{k: results[k] for k in pairs[0] if k in results}] + pairs)
    if args.dedup_cost:
        report_dedup_cost(cost, results["floor (Pillow loop)"], hashed)
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
