"""`maws-data build`: captions -> vocabulary + WebDataset shards + manifest.json, at any scale.

    from maws_data.build import BuildConfig, build
    out = build(BuildConfig(source="../shared/data/instagram/captions.parquet", out="data/ig",
                            image_size=224, shard_size=1000, min_count=5))

The stages, one module each, all run on one runner (`maws_data.runner`: local processes or Ray):
  1. plan        (`maws_data.plan`)      list the source files, count their rows, cut shards
  2. text pass   (`maws_data.textpass`)  row checks, hashtags, unique keys, each distinct tag mapped once, counts
  3. vocabulary  (`maws_data.vocab`)     vocabulary.tsv + hashtag_map.tsv from the merged counts
  4. image pass  (`maws_data.imagepass`) one task per shard: fetch, decode, hash, drop eval copies
                                         (--decontaminate), write tar + index + sidecar + dedup unit + stats
  5. dedup       (`maws_data.deduppass`) --dedup exact|near: decide over every shard's hashes, rewrite
                                         the shards that lost a sample
  6. finish      (`maws_data.finish`)    skipped.jsonl, then manifest.json, last

`--out` is a local folder or `s3://bucket/prefix`. Resume: `build.json` (written before any shard)
records the build's fingerprint (the inputs' sha256 -- size and ETag for remote files -- and every
config field that changes the output). A rerun with the same fingerprint keeps the shards whose
stats JSON says they are finished and redoes the rest; a different fingerprint is refused unless
`overwrite=True`. Shard contents depend only on their rows and the config, never on timing, worker
count or runner, so a resumed build equals a clean one byte for byte.

Memory: the driver holds the plan (O(files + shards)) and the distinct hashtags with their counts;
a worker holds one text unit or one shard (docs/data.md "At scale").
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from maws_data import WORKER_MODULES, digests, storage
from maws_data.dedup.decontam import EVAL_THRESHOLD, DecontamError, EvalIndex
from maws_data.dedup.table import NEAR_THRESHOLD
from maws_data.deduppass import DEDUP_DIR, dedup_pass, remove_table
from maws_data.finish import SKIPPED_NAME, finish
from maws_data.imagepass import SHARDS_DIR, ShardJob, run_shard, write_labels
from maws_data.images import ImageConfig, choose_decoder, cuda_device_count
from maws_data.manifest import (
    MANIFEST_NAME,
    exists,
    read_bytes,
    remove,
    remove_temp_files,
    sha256_file,
    write_bytes,
    write_json,
)
from maws_data.plan import Plan, ScanTask, cut, scan_batch, scan_batches
from maws_data.runner import Runner, RunnerConfig, TaskFailed, local_processes
from maws_data.shards import completed_stats, list_sizes
from maws_data.sources import SourceConfig, list_files
from maws_data.textpass import WORK_DIR, default_cache_dir, safe_key, synset_names, text_pass  # noqa: F401 - safe_key: public API
from maws_data.vocab import (
    HASHTAG_MAP_NAME,
    VOCABULARY_NAME,
    Vocabulary,
    hashtag_map_from_counts,
    vocabulary_from_counts,
)
from maws_data.wordnet import MappingConfig

BUILD_STATE_NAME = "build.json"
BUILD_FORMAT = 3  # in the fingerprint: 2 = streaming builder (null captions kept, per-file shards), 3 = + dedup hashes
EVAL_INDEX_NAME = "eval_index.npz"  # in the work folder: the --decontaminate eval sets' hashes, for the workers
# Config fields that do not change the output bytes (how the work is run, where, how it is shown).
RUNTIME_FIELDS = ("out", "processes", "threads", "runner", "ray_address", "overwrite", "progress",
                  "text_unit_rows", "mapping_cache", "task_timeout_s", "task_retries",
                  "decontaminate")  # the eval sets enter the fingerprint as their index's sha256 instead
MANIFEST_OMITS = ("out", "overwrite", "progress", "mapping_cache")


class BuildError(RuntimeError):
    """The build cannot start or finish as asked (message says what to do); the CLI exits 2."""


@dataclass(frozen=True)
class BuildConfig:
    source: str  # parquet/csv/jsonl file, folder, glob, s3:// prefix, http(s):// file, or HF save_to_disk folder
    out: str  # output folder or s3://bucket/prefix
    key_column: str = "key"
    image_column: str = "image"
    caption_column: str = "caption"
    image_size: int = 256  # shorter side of stored images (never upscaled)
    jpeg_quality: int = 90
    shard_size: int = 1000  # input rows per shard (skipped rows included, so shard i = rows [i*n, (i+1)*n))
    min_count: int = 10  # keep synsets with at least this many images
    max_classes: int | None = None  # and at most this many (most frequent first)
    stoplist: str | None = None  # file of hashtags to ignore (one per line); None = built-in list
    ambiguity: Literal["most_frequent", "all", "skip"] = "most_frequent"  # lemmas with several noun senses
    segmentation: bool = True  # wordsegment as the last mapping rule
    decoder: Literal["auto", "pil", "dali"] = "auto"
    timeout_s: float = 10.0  # per image download attempt
    retries: int = 2  # download retries
    max_download_bytes: int = 20 << 20  # also the cap on a local file's size
    max_pixels: int = 89_478_485  # larger images are skipped (decompression bombs); Pillow's own limit
    processes: int = 0  # worker processes for the local runner; 0 = all cores
    threads: int = 16  # image loads in flight per worker (downloads overlap decoding; s3:// images: threads)
    runner: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # Ray cluster address; None = connect to a running one or start locally
    overwrite: bool = False  # replace an existing build made with another config or input
    progress: bool = True  # progress bar and summary table on stderr
    text_unit_rows: int = 100_000  # rows per text-pass task (rounded to whole shards)
    # hashtag mapping cache folder, which also remembers local source files' sha256 by their stat
    # (maws_data.digests); None = ~/.cache/maws-data/hashtag-maps, "" = off
    mapping_cache: str | None = None
    task_timeout_s: float = 1800.0  # a shard (or text unit) running longer is cancelled and retried (Ray)
    task_retries: int = 3  # Ray: attempts after a lost worker or node, or a deadline
    dedup: Literal["none", "exact", "near"] = "exact"  # drop repeated images: same bytes, or also pHash-near
    near_threshold: int = NEAR_THRESHOLD  # Hamming bits (of 64) for --dedup near (docs/dedup.md)
    decontaminate: tuple[str, ...] = ()  # eval sets (ImageFolder trees or flat folders) whose copies are dropped
    decontaminate_threshold: int = EVAL_THRESHOLD  # Hamming bits for an eval copy (docs/dedup.md)

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        if self.max_classes is not None and self.max_classes < 1:
            raise ValueError(f"max_classes must be >= 1 or None, got {self.max_classes}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.runner not in ("local", "ray"):
            raise ValueError(f"runner must be 'local' or 'ray', got {self.runner!r}")
        if self.decoder not in ("auto", "pil", "dali"):
            raise ValueError(f"decoder must be 'auto', 'pil' or 'dali', got {self.decoder!r}")
        if self.dedup not in ("none", "exact", "near"):
            raise ValueError(f"dedup must be 'none', 'exact' or 'near', got {self.dedup!r}")
        for name in ("near_threshold", "decontaminate_threshold"):
            if not 0 <= getattr(self, name) <= 63:
                raise ValueError(f"{name} must be 0..63 (Hamming bits of a 64-bit hash), got {getattr(self, name)}")
        # one folder, or any sequence of them (a list from a JSON config): always a tuple of str
        paths = (self.decontaminate,) if isinstance(self.decontaminate, (str, Path)) else self.decontaminate
        object.__setattr__(self, "decontaminate", tuple(str(p) for p in paths))
        if self.text_unit_rows < 1 or self.task_timeout_s <= 0 or self.task_retries < 0:
            raise ValueError("text_unit_rows must be >= 1, task_timeout_s > 0 and task_retries >= 0")

    @property
    def num_processes(self) -> int:
        return local_processes(self.processes)

    def image_config(self, decoder: str) -> ImageConfig:
        return ImageConfig(image_size=self.image_size, jpeg_quality=self.jpeg_quality,
                           max_download_bytes=self.max_download_bytes, max_pixels=self.max_pixels,
                           timeout_s=self.timeout_s,
                           retries=self.retries, decoder=decoder)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Entry point


def build(cfg: BuildConfig) -> Path | str:
    """Run (or resume) the build; returns the output folder (a Path, or the URL for object storage).
    Raises SourceError / BuildError."""
    t0 = time.monotonic()
    out = cfg.out if storage.is_remote(cfg.out) else str(Path(cfg.out).absolute())
    src = SourceConfig(cfg.source, key_column=cfg.key_column, image_column=cfg.image_column,
                       caption_column=cfg.caption_column)
    src.wanted  # noqa: B018 - the column-name check, before anything is read
    work = storage.join(out, WORK_DIR)
    rcfg = RunnerConfig(kind=cfg.runner, processes=cfg.num_processes, ray_address=cfg.ray_address,
                        retries=cfg.task_retries, task_timeout_s=cfg.task_timeout_s, progress=cfg.progress)
    try:
        with Runner(rcfg) as runner:
            runner.warm(WORKER_MODULES)  # the workers import while the driver lists, resolves, indexes
            files = list_files(cfg.source)
            decoder = choose_decoder(cfg.image_config(cfg.decoder))
            resolved = {**dataclasses.asdict(cfg), "decoder": decoder}
            # 1. plan (a missing column fails here, before --out is claimed for this config)
            scanned, digest_file = {}, _digest_cache(cfg)
            remembered = digests.load(digest_file)
            scans = [ScanTask(f, src, cfg.shard_size, remembered.get(f.url)) for f in files]
            for batch, results in runner.map(scan_batch, scan_batches(scans, runner.workers), desc="plan"):
                scanned.update((task.file.url, result) for task, result in zip(batch.tasks, results))
            digests.save(digest_file, {f.url: scanned[f.url][2] for f in files if scanned[f.url][2] is not None})
            plan = cut(files, [scanned[f.url][0] for f in files], cfg.shard_size, cfg.text_unit_rows)
            inputs = [scanned[f.url][1] for f in files]
            eval_index = _eval_index(cfg)
            fingerprint = _fingerprint(resolved, inputs, eval_index)
            _prepare_out(out, fingerprint, resolved, inputs, overwrite=cfg.overwrite)
            if eval_index is not None:
                write_bytes(storage.join(work, EVAL_INDEX_NAME), eval_index)

            # 2. text pass, 3. vocabulary
            mapping_cfg = MappingConfig(stoplist_path=cfg.stoplist, ambiguity=cfg.ambiguity,
                                        use_segmentation=cfg.segmentation)
            text = text_pass(plan, src, work, fingerprint, runner, mapping_cfg, cfg.mapping_cache)
            kept = text.synsets.filter(pl.col("count") >= cfg.min_count)["wnid"].to_list()
            names = synset_names(kept, mapping_cfg, cfg.mapping_cache)
            vocab = vocabulary_from_counts(text.synsets, text.tags, min_count=cfg.min_count,
                                           max_classes=cfg.max_classes, synset_name=names.__getitem__)
            write_bytes(storage.join(out, VOCABULARY_NAME), _tsv_bytes(vocab.to_frame()))
            write_bytes(storage.join(out, HASHTAG_MAP_NAME), _tsv_bytes(hashtag_map_from_counts(text.tags)))
            write_labels(work, vocab, text.tags)
            t_text = time.monotonic() - t0
            # the per-tag tables are written: the image pass (the longest stage) does not hold them
            buckets, exceptions, mapped_now, distinct = text.buckets, text.exceptions, text.mapped_now, text.tags.height
            del text

            # 4. image pass
            t1 = time.monotonic()
            resumed = _image_pass(plan, cfg, out, work, fingerprint, decoder, buckets, exceptions, runner,
                                  eval_index=eval_index is not None)
            t_images = time.monotonic() - t1

            # 5. dedup
            if cfg.dedup != "none":
                dedup_pass(plan, out=out, work=work, mode=cfg.dedup, threshold=cfg.near_threshold, runner=runner,
                           processes=cfg.num_processes)
            t_dedup = time.monotonic() - t1 - t_images
    except TaskFailed as e:
        raise BuildError(str(e)) from None

    # 6. finish
    remove_table(work)  # the dedup table first, its decisions last (deduppass.remove_table)
    remove(work)  # before the manifest: a folder with a manifest holds the product only
    head = {"inputs": inputs, "fingerprint": fingerprint,
            # the manifest lives in `out`, and overwrite/progress do not shape it: left out, so a
            # resumed or re-run build writes the same manifest bytes
            "config": {k: v for k, v in resolved.items() if k not in MANIFEST_OMITS}}
    manifest = finish(out, len(plan.shards), head, vocab)
    if cfg.progress:
        _print_summary(manifest, vocab, resumed=resumed, t_text=t_text, t_images=t_images, t_dedup=t_dedup,
                       mapped_now=mapped_now, distinct=distinct)
    return out if storage.is_remote(out) else Path(out)


def _tsv_bytes(frame: pl.DataFrame) -> bytes:
    """A frame as tab-separated UTF-8, written straight to bytes (one row per distinct hashtag can
    be millions: no intermediate Python str)."""
    buf = io.BytesIO()
    frame.write_csv(buf, separator="\t")
    return buf.getvalue()


def _image_pass(plan: Plan, cfg: BuildConfig, out: str, work: str, fingerprint: str, decoder: str, buckets: int,
                exceptions: bool, runner: Runner, *, eval_index: bool) -> int:
    """Run every unfinished shard; returns how many were already finished."""
    shards_url = storage.join(out, SHARDS_DIR)
    if not storage.is_remote(out):
        Path(shards_url).mkdir(parents=True, exist_ok=True)
        remove_temp_files(shards_url)
    listing = list_sizes(shards_url)
    image_cfg = cfg.image_config(decoder)
    dali_device = _dali_device() if decoder == "dali" else "cpu"
    resumed = 0

    def pending():
        nonlocal resumed
        for i, span in enumerate(plan.shards):
            if completed_stats(shards_url, i, fingerprint, listing=listing) is not None:
                resumed += 1
                continue
            yield ShardJob(index=i, file=plan.files[span.file], span=span, source=_source(cfg), out=out, work=work,
                           buckets=buckets, exceptions=exceptions, image=image_cfg, dali_device=dali_device,
                           fingerprint=fingerprint, threads=cfg.threads,
                           dedup_dir=storage.join(work, DEDUP_DIR) if cfg.dedup != "none" else None,
                           eval_index=storage.join(work, EVAL_INDEX_NAME) if eval_index else None,
                           eval_threshold=cfg.decontaminate_threshold)

    for _ in runner.map(run_shard, pending(), desc="images", total_rows=plan.rows):
        pass
    return resumed


def _digest_cache(cfg: BuildConfig) -> Path | None:
    """Where the local source files' digests are remembered (maws_data.digests): in the cache folder,
    beside the hashtag mappings; None with the cache off, or for a remote source (named by ETag)."""
    if cfg.mapping_cache == "" or storage.is_remote(cfg.source):
        return None
    return digests.cache_file(cfg.mapping_cache or default_cache_dir(), str(Path(cfg.source).absolute()))


def _source(cfg: BuildConfig) -> SourceConfig:
    return SourceConfig(cfg.source, key_column=cfg.key_column, image_column=cfg.image_column,
                        caption_column=cfg.caption_column)


def _eval_index(cfg: BuildConfig) -> bytes | None:
    """The --decontaminate eval sets' index, as the bytes the workers load (None without eval sets)."""
    if not cfg.decontaminate:
        return None
    try:
        index = EvalIndex.build(list(cfg.decontaminate))
    except DecontamError as e:
        raise BuildError(f"--decontaminate {e}") from None
    if not len(index):
        raise BuildError(f"--decontaminate {', '.join(cfg.decontaminate)}: no readable image in it")
    if cfg.progress:
        import sys

        print(f"decontaminate: {len(index)} eval images indexed from {len(cfg.decontaminate)} folder(s)"
              + (f", {len(index.unreadable)} unreadable: {index.unreadable[:3]}" if index.unreadable else ""),
              file=sys.stderr)
    return index.to_bytes()


def _fingerprint(resolved: dict, inputs: list[dict], eval_index: bytes | None = None) -> str:
    relevant = {k: v for k, v in resolved.items() if k not in RUNTIME_FIELDS}
    relevant["stoplist_sha256"] = sha256_file(resolved["stoplist"]) if resolved["stoplist"] else None
    relevant["eval_index_sha256"] = hashlib.sha256(eval_index).hexdigest() if eval_index is not None else None
    ids = [i["sha256"] or f"{i['etag']}:{i['bytes']}" for i in inputs]
    blob = json.dumps({"config": relevant, "inputs": ids, "format": BUILD_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _prepare_out(out: str, fingerprint: str, resolved: dict, inputs: list[dict], *, overwrite: bool) -> None:
    """Make `out` ready: empty/new, or a partial/finished build of this very fingerprint (resume)."""
    state_path = storage.join(out, BUILD_STATE_NAME)
    ours = [storage.join(out, n) for n in (MANIFEST_NAME, VOCABULARY_NAME, HASHTAG_MAP_NAME, SKIPPED_NAME,
                                            BUILD_STATE_NAME, SHARDS_DIR, WORK_DIR)]
    if not storage.is_remote(out) and Path(out).exists() and not Path(out).is_dir():
        raise BuildError(f"--out {out} exists and is not a folder")
    existing = [p for p in ours if exists(p)]
    if existing:
        old = None
        try:
            old = json.loads(read_bytes(state_path).decode("utf-8")).get("fingerprint")
        except (FileNotFoundError, ValueError):
            old = None
        if old != fingerprint:
            if not overwrite:
                why = ("was made from a different input or config" if old else
                       "holds build files but no readable build.json")
                raise BuildError(f"--out {out} {why} (fingerprint {old or '?'} != {fingerprint}); "
                                 "use another --out, or --overwrite to replace it")
            for p in existing:
                remove(p)
    if not storage.is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
        remove_temp_files(out)
    if not exists(state_path):
        write_json(state_path, {"fingerprint": fingerprint, "config": resolved, "inputs": inputs})


def _dali_device() -> str:
    return "gpu" if cuda_device_count() > 0 else "cpu"


def _print_summary(manifest: dict, vocab: Vocabulary, *, resumed: int, t_text: float, t_images: float,
                   t_dedup: float, mapped_now: int, distinct: int) -> None:
    from rich.console import Console
    from rich.table import Table

    c = manifest["counts"]
    table = Table(title="maws-data build")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("input rows", str(c["rows"]))
    table.add_row("written (labeled / unlabeled)", f"{c['written']} ({c['labeled']} / {c['unlabeled']})")
    for reason, n in c["skipped"].items():
        table.add_row(f"skipped: {reason}", str(n))
    table.add_row("classes", str(manifest["classes"]))
    table.add_row("shards (resumed)", f"{len(manifest['shards'])} ({resumed})")
    if c.get("caption_missing"):
        table.add_row("written without a caption (caption_missing)", str(c["caption_missing"]))
    table.add_row("distinct hashtags (mapped now / from the cache)", f"{distinct} ({mapped_now} / {distinct - mapped_now})")
    table.add_row("plan + text pass + vocabulary", f"{t_text:.1f} s, {c['rows'] / max(t_text, 1e-9):.0f} rows/s")
    table.add_row("image pass", f"{t_images:.1f} s, {c['written'] / max(t_images, 1e-9):.1f} images/s")
    if manifest["config"].get("dedup", "none") != "none":
        table.add_row(f"dedup pass ({manifest['config']['dedup']})", f"{t_dedup:.1f} s")
    if len(vocab):
        top = ", ".join(f"{n.split('.')[0]} ({k})" for n, k in zip(vocab.names[:5], vocab.counts[:5]))
        table.add_row("top classes", top)
    Console(stderr=True).print(table)
