"""`maws-data`: build WebDataset shards with WordNet labels from a captions table, and inspect them.

    maws-data build --source ../shared/data/instagram/captions.parquet --out data/ig --image-size 224
    maws-data inspect data/ig
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Build and inspect MAWS datasets: captions -> hashtags -> WordNet synsets -> WebDataset shards.")


class Runner(str, Enum):
    local = "local"
    ray = "ray"


class Ambiguity(str, Enum):
    most_frequent = "most_frequent"
    all = "all"
    skip = "skip"


class Dedup(str, Enum):
    none = "none"
    exact = "exact"
    near = "near"


class Decoder(str, Enum):
    auto = "auto"
    pil = "pil"
    dali = "dali"


@app.command()
def build(
    source: Annotated[str, typer.Option(help="Captions table: a parquet/CSV/JSONL file, a folder or glob of them, "
                                             "s3://bucket/prefix, an http(s):// file, or a Hugging Face datasets "
                                             "save_to_disk folder. Relative image paths resolve against each file's "
                                             "folder.")],
    out: Annotated[str, typer.Option(help="Output folder or s3://bucket/prefix (manifest.json, vocabulary.tsv, "
                                          "hashtag_map.tsv, skipped.jsonl, shards/). Rerunning on it resumes "
                                          "the build.")],
    image_size: Annotated[int, typer.Option(help="Shorter side of the stored images in pixels (never upscaled).")] = 256,
    shard_size: Annotated[int, typer.Option(help="Input rows per shard (skipped rows included).")] = 1000,
    min_count: Annotated[int, typer.Option(help="Keep WordNet synsets with at least this many images.")] = 10,
    max_classes: Annotated[int | None, typer.Option(help="Keep at most this many synsets, most frequent first "
                                                            "(ties by wnid). Default: no limit.")] = None,
    processes: Annotated[int, typer.Option(help="Worker processes (local runner; CPUs for a local Ray). "
                                                "0 = all cores.")] = 0,
    threads: Annotated[int, typer.Option(help="Image loads in flight per worker process: HTTP downloads on "
                                              "one libcurl multi handle, or threads for s3:// images "
                                              "(overlaps network waits with decoding).")] = 16,
    runner: Annotated[Runner, typer.Option(help="Run shard tasks in local processes or on Ray.")] = Runner.local,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address for --runner ray (default: a "
                                                            "running cluster, else a local one).")] = None,
    decoder: Annotated[Decoder, typer.Option(help="Image decoder: pil (Pillow-SIMD, CPU), dali (GPU when present), "
                                                  "auto (dali with CUDA, else pil).")] = Decoder.auto,
    jpeg_quality: Annotated[int, typer.Option(help="JPEG quality of the stored images.")] = 90,
    key_column: Annotated[str, typer.Option(help="Name of the key column in the source.")] = "key",
    image_column: Annotated[str, typer.Option(help="Name of the image column: path, URL or bytes.")] = "image",
    caption_column: Annotated[str, typer.Option(help="Name of the caption column.")] = "caption",
    stoplist: Annotated[Path | None, typer.Option(help="File of hashtags to ignore, one per line, replacing the "
                                                          "built-in stop list of generic tags (#instagood, ...).")] = None,
    ambiguity: Annotated[Ambiguity, typer.Option(help="A hashtag whose lemma has several noun senses: "
                                                      "most_frequent (WordNet's first sense), all (every sense), "
                                                      "skip (left unmapped).")] = Ambiguity.most_frequent,
    segmentation: Annotated[bool, typer.Option(help="Split run-together tags into words (wordsegment) as the "
                                                    "last mapping rule (~1 ms per unmapped distinct tag).")] = True,
    max_download_mb: Annotated[float, typer.Option(help="Largest image file or download accepted, in MiB; "
                                                        "larger ones are skipped as too_large.")] = 20.0,
    max_pixels: Annotated[int, typer.Option(help="Images with more pixels are skipped as too_large "
                                                 "(decompression bombs).")] = 89_478_485,
    timeout: Annotated[float, typer.Option(help="Seconds per image download attempt.")] = 10.0,
    retries: Annotated[int, typer.Option(help="Download retries after a timeout, connection error or 5xx.")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing build in --out made from another input or "
                                                 "config (otherwise refused).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar and a summary table on stderr.")] = True,
    s3_endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL for s3:// sources and outputs "
                                                         "(sets MAWS_S3_ENDPOINT; default: AWS_ENDPOINT_URL or AWS).")] = None,
    mapping_cache: Annotated[str | None, typer.Option(help="Folder of the hashtag-mapping cache reused across "
                                                           "builds (default ~/.cache/maws-data/hashtag-maps; "
                                                           "'' turns it off).")] = None,
    text_unit_rows: Annotated[int, typer.Option(help="Rows per text-pass task (rounded to whole shards; output "
                                                     "unchanged).")] = 100_000,
    task_timeout: Annotated[float, typer.Option(help="Seconds a shard task may run before it is cancelled and "
                                                     "retried (Ray) or the build stops (local).")] = 1800.0,
    task_retries: Annotated[int, typer.Option(help="Ray: attempts after a lost worker or node, or a deadline.")] = 3,
    dedup: Annotated[Dedup, typer.Option(help="Drop repeated images, keeping the first in row order: exact (same "
                                              "source bytes: duplicate_image), near (also pHash within "
                                              "--near-threshold bits: near_duplicate), none.")] = Dedup.exact,
    near_threshold: Annotated[int, typer.Option(help="Hamming bits (of 64) for --dedup near; docs/dedup.md has "
                                                     "the precision/recall table.")] = 2,
    decontaminate: Annotated[list[Path] | None, typer.Option(help="An eval set (ImageFolder tree or flat folder of "
                                                                  "images) whose near-copies are dropped as "
                                                                  "eval_contaminated (repeatable).")] = None,
    decontaminate_threshold: Annotated[int, typer.Option(help="Hamming bits at or under which a training image "
                                                              "is a copy of an eval image.")] = 6,
) -> None:
    """Build WebDataset shards, vocabulary and manifest from a captions table (resumable)."""
    from maws_data.runner import TaskFailed

    # a no-op when `main` started it: before anything heavy is imported, the workers import while we do
    _start_pool(processes, s3_endpoint, local=runner is Runner.local)

    from maws_data.build import BuildConfig, BuildError
    from maws_data.build import build as run_build
    from maws_data.sources import SourceError
    from maws_data.wordnet import WordNetMissingError
    try:
        cfg = BuildConfig(source=source, out=out, key_column=key_column, image_column=image_column,
                          caption_column=caption_column, image_size=image_size, jpeg_quality=jpeg_quality,
                          shard_size=shard_size, min_count=min_count, max_classes=max_classes,
                          stoplist=str(stoplist) if stoplist else None, ambiguity=ambiguity.value,
                          segmentation=segmentation, max_download_bytes=int(max_download_mb * (1 << 20)),
                          max_pixels=max_pixels, decoder=decoder.value, timeout_s=timeout,
                          retries=retries, processes=processes, threads=threads, runner=runner.value, ray_address=ray_address,
                          overwrite=overwrite, progress=progress, mapping_cache=mapping_cache,
                          text_unit_rows=text_unit_rows, task_timeout_s=task_timeout, task_retries=task_retries,
                          dedup=dedup.value, near_threshold=near_threshold,
                          decontaminate=tuple(str(p) for p in decontaminate or ()),
                          decontaminate_threshold=decontaminate_threshold)
        if stoplist is not None and not stoplist.is_file():
            raise BuildError(f"--stoplist {stoplist}: no such file")
        result = run_build(cfg)
    except (SourceError, BuildError, WordNetMissingError, TaskFailed, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(result))


@app.command()
def inspect(
    build_dir: Annotated[str, typer.Argument(help="The --out folder (or s3:// / http(s):// prefix) of a finished "
                                                  "`maws-data build`.")],
    top: Annotated[int, typer.Option(help="How many classes to list, most frequent first.")] = 10,
    samples: Annotated[int, typer.Option(help="How many samples to show from the first shard.")] = 3,
) -> None:
    """Print a build's manifest summary, its top classes and a few samples."""
    from rich.console import Console
    from rich.table import Table

    from maws_data.manifest import read_manifest

    try:
        manifest = read_manifest(build_dir)
        vocab = _load_vocabulary(build_dir)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    console = Console(width=120)
    c = manifest["counts"]
    console.print(f"[bold]{build_dir}[/bold]  inputs: " + ", ".join(f"{i['path']} ({'sha256 ' + i['sha256'][:12] if i.get('sha256') else 'etag ' + str(i.get('etag'))[:12]})"
                                                                   for i in manifest["inputs"]))
    console.print(f"rows {c['rows']}  written {c['written']}  labeled {c['labeled']}  unlabeled {c['unlabeled']}  "
                  f"skipped {sum(c['skipped'].values())} {json.dumps(c['skipped'], sort_keys=True)}")
    console.print(f"classes {manifest['classes']}  shards {len(manifest['shards'])}  "
                  f"bytes {sum(s['bytes'] for s in manifest['shards'])}  image_size {manifest['config']['image_size']}")
    cfg = manifest["config"]
    if "dedup" in cfg:
        removed = {r: c["skipped"].get(r, 0) for r in ("duplicate_image", "near_duplicate", "eval_contaminated")}
        console.print(f"dedup {cfg['dedup']}" + (f" (near threshold {cfg['near_threshold']})" if cfg["dedup"] == "near"
                                                  else "")
                      + (f"  decontaminated against {', '.join(cfg['decontaminate'])} (threshold "
                         f"{cfg['decontaminate_threshold']})" if cfg.get("decontaminate") else "")
                      + "  removed " + "  ".join(f"{r} {n}" for r, n in removed.items()))
    table = Table(title=f"top {min(top, len(vocab))} classes")
    for col in ("index", "wnid", "name", "count", "hashtags"):
        table.add_column(col)
    for i in range(min(top, len(vocab))):
        table.add_row(str(i), vocab.wnids[i], vocab.names[i], str(vocab.counts[i]), " ".join(vocab.hashtags[i][:6]))
    console.print(table)
    if manifest["shards"] and samples > 0:
        from maws_data import storage

        _print_samples(console, storage.join(build_dir, manifest["shards"][0]["name"]), samples)


@app.command()
def upgrade(
    build_dir: Annotated[Path, typer.Argument(help="The --out folder of a build made before per-shard sidecars.")],
) -> None:
    """Add the loader's per-shard sample sidecars and sqrt weights to an older build (reads each KEY.json once)."""
    from maws_data.sidecar import upgrade_build

    try:
        n = upgrade_build(build_dir, log=lambda line: typer.echo(line, err=True))
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{build_dir}: {n} sidecars written")


def _load_vocabulary(build_dir: str):
    """vocabulary.tsv of a local or remote build (a remote one through a temporary copy)."""
    import tempfile

    from maws_data import storage
    from maws_data.manifest import read_bytes
    from maws_data.vocab import VOCABULARY_NAME, Vocabulary

    if not storage.is_remote(build_dir):
        return Vocabulary.load(build_dir)
    with tempfile.TemporaryDirectory(prefix="maws-inspect-") as tmp:
        path = Path(tmp) / VOCABULARY_NAME
        path.write_bytes(read_bytes(storage.join(build_dir, VOCABULARY_NAME)))
        return Vocabulary.load(path)


def _print_samples(console, tar_url: str, n: int) -> None:
    from rich.table import Table

    from maws_data import storage

    table = Table(title=f"first {n} samples of {tar_url.rsplit('/', 1)[-1]}")
    table.add_column("key", no_wrap=True)
    table.add_column("cls", no_wrap=True)
    table.add_column("size", no_wrap=True)
    table.add_column("wnids")
    table.add_column("caption")
    fs, path = storage.filesystem(tar_url)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:  # streamed: reads the first samples only
        for m in tf:
            if not m.name.endswith(".json"):
                continue
            meta = json.loads(tf.extractfile(m).read())
            caption = meta["caption"] or ""  # null: an unlabeled row without a caption (caption_missing)
            caption = caption if len(caption) <= 60 else caption[:57] + "..."
            table.add_row(meta["key"], str(meta["labels"][0] if meta["labels"] else -1),
                          f"{meta['width']}x{meta['height']}", " ".join(meta["wnids"]), caption)
            n -= 1
            if n == 0:
                break
    console.print(table)


@app.command()
def decontaminate(
    build_dir: Annotated[str, typer.Argument(help="The --out folder (or s3:// / http(s):// prefix) of a finished "
                                                  "`maws-data build`.")],
    against: Annotated[list[Path], typer.Option(help="An eval set: ImageFolder tree or flat folder of images "
                                                     "(repeatable).")],
    threshold: Annotated[int, typer.Option(help="Hamming distance (of 64 bits) at or under which a sample is a "
                                                "copy of an eval image (docs/dedup.md).")] = 6,
    out: Annotated[Path | None, typer.Option(help="Write the full report (every match) as JSON here.")] = None,
    threads: Annotated[int, typer.Option(help="Decode/hash threads.")] = 8,
) -> None:
    """Report the samples of an existing build that are near-copies of eval images (counts + list)."""
    from maws_data.dedup.decontam import DecontamError, write_report
    from maws_data.dedup.decontam import decontaminate as run_decontaminate

    try:
        report = run_decontaminate(build_dir, against, threshold=threshold, threads=threads)
        if out is not None:
            write_report(report, out)
    except (DecontamError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{build_dir}: {report['contaminated']} of {report['samples']} samples within {threshold} bits of "
               f"{report['eval_images']} eval images " + json.dumps(report["by_eval_set"], sort_keys=True))
    for m in report["matches"][:20]:
        typer.echo(f"  {m['key']}  ({m['shard']})  ~ {m['eval_file']}  distance {m['distance']}")
    if len(report["matches"]) > 20:
        typer.echo(f"  ... {len(report['matches']) - 20} more" + (f" in {out}" if out else " (--out for all)"))
    for f in report["eval_unreadable"]:
        typer.echo(f"warning: eval image not readable, skipped: {f}", err=True)


def main() -> None:
    """The `maws-data` command. For a local `build` the worker pool starts first of all, before typer
    parses the command line (~0.16 s: it coerces every option through pydantic): the pool's server
    then imports the workers' modules (~0.6 s) while typer parses and the driver imports its own."""
    _start_build_pool(sys.argv[1:])
    app()


def _start_build_pool(argv: list[str]) -> None:
    """`runner.start_early` for `maws-data build` on the local runner, from the few options that shape
    the pool (--processes, --runner, --s3-endpoint), read here the way click reads them. Anything
    this does not understand leaves the pool to `build` (which calls start_early itself, a no-op
    once started) and typer to report."""
    if not argv or argv[0] != "build" or {"--help", "-h"} & set(argv):
        return
    given: dict[str, str] = {}
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in ("--processes", "--runner", "--s3-endpoint"):
            given[name] = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    try:
        processes = int(given.get("--processes", "0"))
    except ValueError:
        return
    if processes >= 0:
        _start_pool(processes, given.get("--s3-endpoint") or None,
                    local=given.get("--runner", Runner.local.value) == Runner.local.value)


def _start_pool(processes: int, s3_endpoint: str | None, *, local: bool) -> None:
    """What the workers copy when they start (MAWS_S3_ENDPOINT, the library thread limits, set before
    polars is imported here or in a worker), then the local pool (`runner.start_early`, once)."""
    from maws_data import WORKER_MODULES
    from maws_data.runner import limit_threads, local_processes, start_early

    if s3_endpoint:
        os.environ["MAWS_S3_ENDPOINT"] = s3_endpoint
    if local:
        limit_threads(local_processes(processes))
        start_early(local_processes(processes), WORKER_MODULES)


if __name__ == "__main__":
    main()
