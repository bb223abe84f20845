"""Loader throughput (images/s at 224 px): our backends against torchvision ImageFolder, same run.

The shards are a real build (`maws_data.build`) of the Instagram photos at --image-size (shorter side,
default 256, never upscaled); the baseline reads the very same JPEGs extracted from those shards into
an ImageFolder tree (one folder per first label). Every contender uses the same recipe (eval: resize
256 + centre crop 224; mae: RandomResizedCrop(0.2-1, bicubic) + flip; ImageNet normalisation, float32
NCHW), the same batch size and the same number of workers:

  baseline    torchvision.datasets.ImageFolder + transforms (PIL) + torch DataLoader(num_workers=W)
  wds-pipeline  the plain webdataset pipeline a user would write instead, on the same tars:
              wds.WebDataset(urls, shardshuffle=100).shuffle(1000).decode("pil").map(transform).batched(B)
              on DataLoader(num_workers=W) (eval: no shuffles)
  webdataset  maws_data.loader, Pillow-SIMD on DataLoader workers (W processes)
  dali-cpu    maws_data.loader, DALI pipeline on the CPU (W decode threads)
  dali-gpu    DALI "mixed" nvJPEG decoding (only with CUDA; not measurable on a CPU machine)
  webdataset-http  the webdataset backend reading the same build over http://127.0.0.1 (a local server
              answering byte ranges, in a child process): the remote read path (ranged GETs) at no latency

`--remote` measures only the remote read path: the webdataset backend over http://127.0.0.1 for each
`--remote-blocks` size (MiB; 0 = one ranged GET per shard per batch, the reader before blocks), with
the requests and bytes the server answered per epoch, next to the same loader on the local build.

With CUDA, two ceilings for dali-gpu are measured on the same JPEGs, held in memory (no host reads, no
per-sample Python): `nvjpeg-decode` (fn.decoders.image "mixed" alone: the decoder's own limit) and
`nvjpeg-rrc` (decode + DALI's own random_resized_crop + normalise: the pipeline's GPU-side limit).

Each contender runs --epochs passes over the data; the first batch of each pass (worker start-up,
pipeline build) is excluded from the timing. Ratios are against the ImageFolder baseline of the same task
(and, in brackets, against the wds pipeline).

    uv run python tools/bench/loader.py                      # 2 workers, batch 64, eval + mae
    uv run python tools/bench/loader.py --workers 4 --epochs 2 --tasks mae
    uv run python tools/bench/loader.py --remote --tasks mae --epochs 2 --remote-blocks 0 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "instagram"
NLTK_DATA = ROOT.parent / "shared" / "data" / "nltk_data"


def build_shards(out: Path, *, image_size: int, processes: int) -> Path:
    """A real build of the whole Instagram table (reused when already there)."""
    from maws_data.build import BuildConfig, build

    os.environ.setdefault("NLTK_DATA", str(NLTK_DATA))
    if (out / "manifest.json").exists():
        return out
    cfg = BuildConfig(source=str(DEFAULT_DATA / "captions.parquet"), out=str(out), image_size=image_size,
                      shard_size=500, min_count=5, decoder="pil", processes=processes, progress=False)
    return build(cfg)


def build_jpegs(build: Path):
    """(key, first label, JPEG bytes) of every sample of the build, shard by shard (from the sidecars)."""
    from maws_data.loader import open_index, read_sidecar

    index = open_index(str(build))
    for s, tar in enumerate(index.tars):
        side = read_sidecar(index, s)
        fd = os.open(tar, os.O_RDONLY)
        for i in range(int(index.samples[s])):
            labels = side.labels_of(i)
            yield (side.key[i].decode(), int(labels[0]) if len(labels) else -1,
                   os.pread(fd, int(side.jpg_size[i]), int(side.jpg_offset[i])))
        os.close(fd)


def extract_folder(build: Path, folder: Path) -> int:
    """The build's JPEG bytes, unchanged, as folder/<first label>/<key>.jpg for ImageFolder."""
    n = 0
    if not folder.exists():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for key, label, data in build_jpegs(build):
            d = tmp / f"c{label + 1:04d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{key}.jpg").write_bytes(data)
        os.replace(tmp, folder)
    n = sum(1 for _ in folder.rglob("*.jpg"))
    return n


def time_batches(batches, epochs: int, read: bool = False) -> tuple[int, float]:
    """Images and seconds over `epochs` passes, each pass's first batch (start-up) not timed.

    read: the consumer reads every pixel of every batch once (a sum), as a copy to the device does;
    otherwise it only counts (the loader's own rate)."""
    images, seconds = 0, 0.0
    for _ in range(epochs):
        it = iter(batches)
        next(it)
        t0 = time.perf_counter()
        for x, _ in it:
            if read:
                x.sum()
            images += len(x)
        seconds += time.perf_counter() - t0
    return images, seconds


def run_baseline(folder: Path, task: str, args) -> tuple[int, float]:
    from maws_data.transforms import torchvision_transform
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(folder), transform=torchvision_transform(task, args.size))
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=task != "eval",
                                     num_workers=args.workers, drop_last=True)
    return time_batches(dl, args.epochs, args.consume == "read")


def run_webdataset_pipeline(build: Path, task: str, args) -> tuple[int, float]:
    """What a user would write instead: the plain webdataset pipeline over the same tars, same workers,
    `wds.WebDataset(urls, shardshuffle=...).shuffle(1000).decode("pil").map(transform).batched(B)`
    (eval: no shard or sample shuffle)."""
    import webdataset as wds
    from maws_data.loader import open_index
    from maws_data.transforms import torchvision_transform

    urls = open_index(str(build)).tars
    transform = torchvision_transform(task, args.size)
    shuffle = task != "eval"

    def sample(s):
        return transform(s["jpg"]), (json.loads(s["json"]) if isinstance(s["json"], bytes) else s["json"])["labels"][:1]

    ds = (wds.WebDataset(urls, shardshuffle=100 if shuffle else False, empty_check=False)
          .shuffle(1000 if shuffle else 0).decode("pil").map(sample)
          .map(lambda s: (s[0], s[1][0] if s[1] else -1)).batched(args.batch_size, partial=False))
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers)
    return time_batches(dl, args.epochs, args.consume == "read")


def serve_http(folder: Path, counts=None) -> str:
    """Serve `folder` on http://127.0.0.1 (byte ranges, as object stores and CDNs answer them) from a
    separate process (a server thread here would share this process's GIL with the loader's main loop;
    on the 2-core machine it still shares the cores). `counts`: a shared int64 array (ranged GETs of
    tars, their bytes) the server adds to."""
    import multiprocessing
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Ranges(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            path, rng = self.translate_path(self.path), self.headers.get("Range", "")
            if not rng.startswith("bytes=") or not os.path.isfile(path):
                return super().do_GET()
            size = os.path.getsize(path)
            a, _, b = rng[6:].partition("-")
            start, end = int(a), min(int(b) if b else size - 1, size - 1)
            with open(path, "rb") as f:
                f.seek(start)
                body = f.read(end - start + 1)
            if counts is not None and path.endswith(".tar"):
                with counts.get_lock():
                    counts[0] += 1
                    counts[1] += len(body)
            self.send_response(206)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # socketserver's default backlog of 5 drops connections (1 s SYN retry)

    server = Server(("127.0.0.1", 0), lambda *a: Ranges(*a, directory=str(folder.parent)))
    multiprocessing.get_context("fork").Process(target=server.serve_forever, daemon=True).start()
    server.socket.close()  # the child serves it
    return f"http://127.0.0.1:{server.server_address[1]}/{folder.name}"


def run_ours(build: Path | str, task: str, backend: str, args, *, dali_device: str = "cpu",
             **options) -> tuple[int, float]:
    from maws_data.loader import LoaderConfig, build_loader

    cfg = LoaderConfig(shards=str(build), task=task, batch_size=args.batch_size, image_size=args.size,
                       backend=backend, num_workers=args.workers, dali_threads=max(1, args.workers),
                       dali_device=dali_device, **options)
    loader = build_loader(cfg, rank=0, world_size=getattr(args, "world_size", 1))

    class Epochs:  # a new epoch (new order) per pass, as in training
        epoch = 0

        def __iter__(self):
            loader.set_epoch(Epochs.epoch)
            Epochs.epoch += 1
            if dali_device == "gpu":
                for x, y in loader:
                    torch.cuda.synchronize()
                    yield x, y
            else:
                yield from loader

    return time_batches(Epochs(), args.epochs, args.consume == "read")


def run_decoder_limits(build: Path, args) -> dict[str, float]:
    """Images/s of DALI "mixed" decoding alone and of decode + crop/resize/normalise, fed from memory."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    jpegs = [np.frombuffer(data, np.uint8) for _, _, data in build_jpegs(build)]
    bs = args.batch_size
    batches = [jpegs[i:i + bs] for i in range(0, len(jpegs) - bs + 1, bs)]
    rates = {}
    @pipeline_def(batch_size=bs, num_threads=max(1, args.workers), device_id=0, prefetch_queue_depth=2)
    def pipe(crop: bool):
        data = fn.external_source(source=lambda info: batches[info.iteration % len(batches)], batch=True,
                                  batch_info=True, dtype=types.UINT8)
        images = fn.decoders.image(data, device="mixed", output_type=types.RGB)
        if crop:
            images = fn.random_resized_crop(images, size=[args.size, args.size], random_area=[0.2, 1.0],
                                            interp_type=types.INTERP_CUBIC)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mirror=fn.random.coin_flip(), mean=[124.0, 116.0, 104.0],
                                              std=[58.4, 57.1, 57.4])
        return images

    for name in ("nvjpeg-decode", "nvjpeg-rrc"):
        p = pipe(crop=name == "nvjpeg-rrc")
        p.build()
        for _ in range(3):
            p.run()
        torch.cuda.synchronize()
        runs = args.epochs * len(batches)
        t0 = time.perf_counter()
        for _ in range(runs):
            p.run()
        torch.cuda.synchronize()
        rates[name] = runs * bs / (time.perf_counter() - t0)
        del p
    return rates


def read_only(shards: str, task: str, args, **options) -> float:
    """Seconds to read (not decode) the JPEG bytes of one epoch's batches in this process: the read path alone."""
    from maws_data.loader import LoaderConfig, build_loader

    loader = build_loader(LoaderConfig(shards=shards, task=task, batch_size=args.batch_size, backend="webdataset",
                                       num_workers=0, **options), rank=0, world_size=args.world_size)
    source, files = loader.source, loader._files
    source.set_reader(1, 0, 0, 0)
    t0 = time.perf_counter()
    for b in range(len(loader)):
        s, _ = source.batch(0, b)
        files.read(s.shard, s.offset, s.size, ahead=lambda sh: source.ahead(0, sh))
    return time.perf_counter() - t0


def run_remote(build: Path, args) -> list[dict]:
    """img/s, ranged GETs and bytes per epoch over http://127.0.0.1 for each block size, and local."""
    import multiprocessing

    counts = multiprocessing.get_context("fork").Array("q", 2)
    url = serve_http(build, counts)
    results = []
    streams = {"read_streams": args.read_streams}
    for task in args.tasks:
        imgs, secs = run_ours(build, task, "webdataset", args, **streams)
        results.append({"task": task, "loader": "local", "images_per_s": imgs / secs})
        print(f"{task:5s} {'local':22s} {imgs / secs:9.1f} img/s", flush=True)
        for mib in args.remote_blocks:
            counts[0] = counts[1] = 0
            imgs, secs = run_ours(url, task, "webdataset", args, remote_block_bytes=int(mib * (1 << 20)), **streams)
            requests, nbytes = counts[0] / args.epochs, counts[1] / args.epochs
            reading = read_only(url, task, args, remote_block_bytes=int(mib * (1 << 20)), **streams)
            name = f"http block {mib:g} MiB" if mib else "http per-batch ranges"
            results.append({"task": task, "loader": name, "images_per_s": imgs / secs, "requests_per_epoch": requests,
                            "mean_request_bytes": nbytes / max(1, requests), "bytes_per_epoch": nbytes,
                            "read_only_s_per_epoch": reading})
            print(f"{task:5s} {name:22s} {imgs / secs:9.1f} img/s  {requests:7.1f} requests/epoch, mean "
                  f"{nbytes / max(1, requests) / 1024:8.1f} KiB, {nbytes / 2**20:6.1f} MiB/epoch; reading alone "
                  f"(1 process) {reading:.2f} s/epoch  (load {os.getloadavg()[0]:.2f})", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/maws-bench-loader"), help="build + folder cache")
    p.add_argument("--image-size", type=int, default=256, help="shorter side of the stored JPEGs")
    p.add_argument("--size", type=int, default=224, help="output image size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--tasks", nargs="+", default=["eval", "mae"])
    p.add_argument("--backends", nargs="+", default=["webdataset", "dali-cpu", "dali-gpu"])
    p.add_argument("--consume", choices=["count", "read"], default="count",
                   help="what the timed loop does with a batch: count it, or read every pixel once (x.sum())")
    p.add_argument("--remote", action="store_true", help="only the remote read path (http) per block size")
    p.add_argument("--remote-blocks", nargs="+", type=float, default=[0, 8],
                   help="--remote: remote_block_bytes in MiB (0: one range per shard per batch)")
    p.add_argument("--world-size", type=int, default=1, help="--remote: measure rank 0 of this many")
    p.add_argument("--read-streams", type=int, default=8, help="--remote: LoaderConfig.read_streams")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(1)  # the main process only collates; workers do the work

    build = build_shards(args.work / f"build-{args.image_size}", image_size=args.image_size,
                         processes=args.workers)
    folder = args.work / f"imagefolder-{args.image_size}"
    n = extract_folder(build, folder)
    print(f"{n} images, stored shorter side {args.image_size}, output {args.size}, batch {args.batch_size}, "
          f"{args.workers} workers, {args.epochs} epoch(s), consumer {args.consume}, {os.cpu_count()} CPUs, "
          f"CUDA {'yes' if torch.cuda.is_available() else 'no'}, load average {os.getloadavg()}", flush=True)
    results, http_url = [], None
    if args.remote:
        print(f"remote: rank 0 of {args.world_size}, read_streams {args.read_streams}", flush=True)
        results = run_remote(build, args)
        args.tasks = []
    for task in args.tasks:
        imgs, secs = run_baseline(folder, task, args)
        base = imgs / secs
        results.append({"task": task, "loader": "imagefolder-baseline", "images": imgs, "seconds": secs,
                        "images_per_s": base, "ratio": 1.0})
        print(f"{task:5s} {'imagefolder-baseline':22s} {base:9.1f} img/s   1.00x", flush=True)
        imgs, secs = run_webdataset_pipeline(build, task, args)
        wds_rate = imgs / secs
        results.append({"task": task, "loader": "wds-pipeline-baseline", "images": imgs, "seconds": secs,
                        "images_per_s": wds_rate, "ratio": wds_rate / base})
        print(f"{task:5s} {'wds-pipeline-baseline':22s} {wds_rate:9.1f} img/s {wds_rate / base:6.2f}x", flush=True)
        for backend in args.backends:
            if backend == "dali-gpu" and not torch.cuda.is_available():
                print(f"{task:5s} {backend:22s}  not measured: no CUDA on this machine", flush=True)
                continue
            name, dev = ("dali", backend.split("-")[1]) if backend.startswith("dali") else (backend, "cpu")
            source = build
            if backend == "webdataset-http":  # the same build read over http://127.0.0.1 (ranged GETs)
                name, source = "webdataset", http_url or serve_http(build)
                http_url = source
            imgs, secs = run_ours(source, task, name, args, dali_device=dev)
            rate = imgs / secs
            results.append({"task": task, "loader": backend, "images": imgs, "seconds": secs,
                            "images_per_s": rate, "ratio": rate / base, "ratio_wds": rate / wds_rate})
            print(f"{task:5s} {backend:22s} {rate:9.1f} img/s {rate / base:6.2f}x  ({rate / wds_rate:.2f}x the wds "
                  f"pipeline)", flush=True)
    if torch.cuda.is_available() and "dali-gpu" in args.backends and not args.remote:
        for name, rate in run_decoder_limits(build, args).items():
            results.append({"task": "ceiling", "loader": name, "images_per_s": rate})
            print(f"ceil  {name:22s} {rate:9.1f} img/s  (JPEGs in memory, no host reads)", flush=True)
    print(f"load average after: {os.getloadavg()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
