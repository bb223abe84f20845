"""`maws-data build`: captions table -> vocabulary + WebDataset shards + manifest.json.

    from maws_data.build import BuildConfig, build
    out = build(BuildConfig(source="../shared/data/instagram/captions.parquet", out="data/ig",
                            image_size=224, shard_size=1000, min_count=5))

Pass 1 (text only, whole input, one process): read the source, check every row (key, caption),
extract hashtags, map each distinct hashtag once to WordNet synsets, count images per synset and
write vocabulary.tsv + hashtag_map.tsv. Pass 2 (images, parallel): input rows are cut into shards of
`shard_size` consecutive rows; each shard is one task (`maws_data.shards.write_shard`) run by a local
process pool or by Ray. Last, the per-shard skip lists are merged into skipped.jsonl and
manifest.json is written (atomically, after everything else).

Resume: `build.json` (written before any shard) records the build's fingerprint (sha256 of the
inputs and of every config field that changes the output). A rerun with the same fingerprint keeps
the shards whose stats JSON says they are finished (tar size and sha256 checked) and redoes the
rest; a different fingerprint is refused unless `overwrite=True`. Shard contents depend only on
their rows and the config, never on timing or worker count, so a resumed build equals a clean one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from maws_data.hashtags import extract_hashtags_batch
from maws_data.images import ImageConfig, choose_decoder
from maws_data.manifest import (
    MANIFEST_NAME,
    atomic_write_json,
    atomic_write_text,
    dumps_json,
    remove_temp_files,
    sha256_file,
    write_manifest,
)
from maws_data.shards import ShardRow, ShardTask, completed_stats, write_shard
from maws_data.sources import SourceConfig, read_source, source_files
from maws_data.vocab import (
    HASHTAG_MAP_NAME,
    VOCABULARY_NAME,
    Vocabulary,
    build_vocabulary,
    hashtag_map_frame,
    label_rows,
    row_synsets,
    tag_frame,
    write_hashtag_map,
)
from maws_data.wordnet import HashtagMapper, MappingConfig, synset_name

BUILD_STATE_NAME = "build.json"
SKIPPED_NAME = "skipped.jsonl"
SHARDS_DIR = "shards"
# Config fields that do not change the output bytes (how the work is run, where, how it is shown).
RUNTIME_FIELDS = ("out", "processes", "threads", "runner", "ray_address", "overwrite", "progress")
MANIFEST_OMITS = ("out", "overwrite", "progress")
KEY_MAX_LEN = 64  # tar USTAR names hold 100 bytes; leave room for ".json" and margin
UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


class BuildError(RuntimeError):
    """The build cannot start or finish as asked (message says what to do); the CLI exits 1."""


@dataclass(frozen=True)
class BuildConfig:
    source: str  # parquet/csv/jsonl file or folder of them
    out: str  # output folder
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
    threads: int = 16  # image load/decode threads per worker (overlap downloads with decoding)
    runner: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # Ray cluster address; None = connect to a running one or start locally
    overwrite: bool = False  # replace an existing build made with another config or input
    progress: bool = True  # progress bar and summary table on stderr

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

    @property
    def num_processes(self) -> int:
        return self.processes or os.cpu_count() or 1

    def image_config(self, decoder: str) -> ImageConfig:
        return ImageConfig(image_size=self.image_size, jpeg_quality=self.jpeg_quality,
                           max_download_bytes=self.max_download_bytes, max_pixels=self.max_pixels,
                           timeout_s=self.timeout_s,
                           retries=self.retries, decoder=decoder)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Entry point


def build(cfg: BuildConfig) -> Path:
    """Run (or resume) the build; returns the output folder. Raises SourceError / BuildError."""
    t0 = time.monotonic()
    out = Path(cfg.out)
    src = SourceConfig(cfg.source, key_column=cfg.key_column, image_column=cfg.image_column,
                       caption_column=cfg.caption_column)
    inputs = [{"path": str(f.resolve()), "sha256": sha256_file(f), "bytes": f.stat().st_size}
              for f in source_files(cfg.source)]
    decoder = choose_decoder(cfg.image_config(cfg.decoder))
    resolved = {**dataclasses.asdict(cfg), "decoder": decoder}
    fingerprint = _fingerprint(resolved, inputs)
    df = read_source(src)  # a missing column fails here, before --out is claimed for this config
    _prepare_out(out, fingerprint, resolved, inputs, overwrite=cfg.overwrite)

    # Pass 1: text.
    plan = plan_rows(df)
    tags = _map_tags(plan, cfg)
    row_tags = plan.select("row", "hashtags")
    row_wnids = row_synsets(row_tags, tags)
    vocab = build_vocabulary(row_tags, row_wnids, tags, min_count=cfg.min_count, max_classes=cfg.max_classes,
                             synset_name=synset_name)
    vocab.save(out)
    write_hashtag_map(out, hashtag_map_frame(row_tags, tags))
    labels = label_rows(row_wnids, vocab)
    t_text = time.monotonic() - t0

    # Pass 2: images, one task per shard.
    shards_dir = out / SHARDS_DIR
    shards_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(shards_dir)
    image_cfg = cfg.image_config(decoder)
    dali_device = _dali_device() if decoder == "dali" else "cpu"
    tasks = list(make_tasks(df, plan, labels, shard_size=cfg.shard_size, shards_dir=shards_dir,
                            image_cfg=image_cfg, dali_device=dali_device, fingerprint=fingerprint,
                            threads=cfg.threads, class_counts=vocab.counts))
    stats: dict[int, dict] = {}
    pending = []
    for t in tasks:
        done = completed_stats(shards_dir, t.index, fingerprint)
        if done is None:
            pending.append(t)
        else:
            stats[t.index] = done
    t1 = time.monotonic()
    for index, s in _run(pending, cfg):
        stats[index] = s
    t_images = time.monotonic() - t1

    manifest = _finish(out, cfg, resolved, inputs, fingerprint, vocab, [stats[t.index] for t in tasks])
    if cfg.progress:
        _print_summary(manifest, vocab, resumed=len(tasks) - len(pending), t_text=t_text, t_images=t_images)
    return out


def _fingerprint(resolved: dict, inputs: list[dict]) -> str:
    relevant = {k: v for k, v in resolved.items() if k not in RUNTIME_FIELDS}
    relevant["stoplist_sha256"] = sha256_file(resolved["stoplist"]) if resolved["stoplist"] else None
    blob = json.dumps({"config": relevant, "inputs": [i["sha256"] for i in inputs]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _prepare_out(out: Path, fingerprint: str, resolved: dict, inputs: list[dict], *, overwrite: bool) -> None:
    """Make `out` ready: empty/new, or a partial/finished build of this very fingerprint (resume)."""
    state_path = out / BUILD_STATE_NAME
    ours = [out / n for n in (MANIFEST_NAME, VOCABULARY_NAME, HASHTAG_MAP_NAME, SKIPPED_NAME, BUILD_STATE_NAME,
                              SHARDS_DIR)]
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a folder")
    existing = [p for p in ours if p.exists()]
    if existing:
        old = None
        if state_path.is_file():
            try:
                old = json.loads(state_path.read_text(encoding="utf-8")).get("fingerprint")
            except ValueError:
                old = None
        if old != fingerprint:
            if not overwrite:
                why = ("was made from a different input or config" if old else
                       "holds build files but no readable build.json")
                raise BuildError(f"--out {out} {why} (fingerprint {old or '?'} != {fingerprint}); "
                                 "use another --out, or --overwrite to replace it")
            for p in existing:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out)
    if not state_path.is_file():
        atomic_write_json(state_path, {"fingerprint": fingerprint, "config": resolved, "inputs": inputs})


# ---------------------------------------------------------------------------------------------
# Pass 1: row checks, hashtags, mapping


def plan_rows(df: pl.DataFrame) -> pl.DataFrame:
    """Decide every row's fate from its text alone.

    Returns columns row, source_key, key (webdataset-safe, unique; null when skipped), reason and
    detail (null when the row goes on to pass 2), caption, hashtags (list, empty when skipped).
    Checks, in order: reader problem (non-UTF-8 caption/key/image, bad JSON line) -> null_key ->
    null_caption -> duplicate_key (the first usable row with a key keeps it; later ones are skipped).
    """
    keys, reasons, details = [], [], []
    seen: dict[str, int] = {}
    used: set[str] = set()
    for row, key, caption, problem in zip(df["row"].to_list(), df["key"].to_list(), df["caption"].to_list(),
                                          df["problem"].to_list()):
        reason, detail = None, None
        if problem:
            reason, detail = problem, "the source reader could not read this row cleanly"
        elif key is None or not key.strip():
            reason, detail = "null_key", "the key is null or empty"
        elif caption is None:
            reason, detail = "null_caption", "the caption is null"
        elif key in seen:
            reason, detail = "duplicate_key", f"key {key!r} already used by row {seen[key]}"
        if reason is not None:
            keys.append(None)
        else:
            seen[key] = row
            keys.append(safe_key(key, row, used))
        reasons.append(reason)
        details.append(detail)
    valid = [r is None for r in reasons]
    captions = df["caption"].to_list()
    tags = extract_hashtags_batch([c if ok else "" for c, ok in zip(captions, valid)])
    return pl.DataFrame({
        "row": df["row"],
        "source_key": df["key"],
        "key": pl.Series(keys, dtype=pl.String),
        "reason": pl.Series(reasons, dtype=pl.String),
        "detail": pl.Series(details, dtype=pl.String),
        "caption": df["caption"],
        "hashtags": pl.Series([t if ok else [] for t, ok in zip(tags, valid)], dtype=pl.List(pl.String)),
    })


def safe_key(key: str, row: int, used: set[str]) -> str:
    """A webdataset-safe version of `key` (ASCII letters, digits, '_', '-'; at most KEY_MAX_LEN), unique
    among `used` (which it updates): '.', '/', whitespace etc. become '_'; a collision gets '_r<row>'."""
    safe = UNSAFE_KEY_CHARS.sub("_", key)
    if len(safe) > KEY_MAX_LEN:
        safe = safe[:KEY_MAX_LEN - 17] + "_" + hashlib.sha1(key.encode()).hexdigest()[:16]
    candidate, n = safe, 0
    while candidate in used:
        n += 1
        candidate = f"{safe}_r{row}" if n == 1 else f"{safe}_r{row}_{n}"
    used.add(candidate)
    return candidate


def _map_tags(plan: pl.DataFrame, cfg: BuildConfig) -> pl.DataFrame:
    """Map every distinct hashtag once: hashtag, wnids (list), rule."""
    distinct = sorted(set(plan["hashtags"].explode().drop_nulls().to_list()))
    mapper = HashtagMapper(MappingConfig(stoplist_path=cfg.stoplist, ambiguity=cfg.ambiguity,
                                         use_segmentation=cfg.segmentation))
    wnids, rules = {}, {}
    for tag in distinct:
        w, rule = mapper.explain(tag)
        wnids[tag], rules[tag] = list(w), rule
    return tag_frame(wnids, rules)


# ---------------------------------------------------------------------------------------------
# Pass 2: tasks and runners


def make_tasks(df: pl.DataFrame, plan: pl.DataFrame, labels: pl.DataFrame, *, shard_size: int, shards_dir: Path,
               image_cfg: ImageConfig, dali_device: str, fingerprint: str, threads: int = 16,
               class_counts: tuple[int, ...] = ()) -> Iterator[ShardTask]:
    """Cut the rows into shards of `shard_size` consecutive input rows."""
    n = df.height
    images = df["image"].to_list()
    base_dirs = df["base_dir"].to_list()
    cols = {c: plan[c].to_list() for c in ("source_key", "key", "reason", "detail", "caption", "hashtags")}
    kept, idx = labels["kept"].to_list(), labels["labels"].to_list()
    for s, start in enumerate(range(0, n, shard_size)):
        end = min(start + shard_size, n)
        rows, skipped = [], []
        for i in range(start, end):
            if cols["reason"][i] is not None:
                skipped.append({"row": i, "key": cols["source_key"][i], "reason": cols["reason"][i],
                                "detail": cols["detail"][i]})
                continue
            rows.append(ShardRow(row=i, key=cols["key"][i], source_key=cols["source_key"][i], image=images[i],
                                 base_dir=base_dirs[i], caption=cols["caption"][i], hashtags=cols["hashtags"][i],
                                 wnids=kept[i], labels=idx[i]))
        yield ShardTask(index=s, first_row=start, end_row=end, rows=rows, skipped=skipped,
                        shards_dir=str(shards_dir), image=image_cfg, dali_device=dali_device,
                        fingerprint=fingerprint, threads=threads, class_counts=class_counts)


def _dali_device() -> str:
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _run(pending: list[ShardTask], cfg: BuildConfig) -> Iterator[tuple[int, dict]]:
    """Run the shard tasks; yields (shard index, stats) as they finish, with a progress bar."""
    if not pending:
        return
    bar = _Progress(sum(t.end_row - t.first_row for t in pending), enabled=cfg.progress)
    try:
        for task, stats in _execute(pending, cfg):
            bar.update(task.end_row - task.first_row, stats["samples"])
            yield task.index, stats
    finally:
        bar.close()


def _execute(pending: list[ShardTask], cfg: BuildConfig) -> Iterator[tuple[ShardTask, dict]]:
    if cfg.runner == "ray":
        yield from _execute_ray(pending, cfg)
        return
    workers = min(cfg.num_processes, len(pending))
    if workers <= 1:
        for t in pending:
            yield t, write_shard(t)
        return
    # spawn, not fork: the parent may hold torch/DALI/CUDA state or threads that a fork would copy
    # half-initialised; the workers import only maws_data.shards and its image code.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(write_shard, t): t for t in pending}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()


def _execute_ray(pending: list[ShardTask], cfg: BuildConfig) -> Iterator[tuple[ShardTask, dict]]:
    import ray

    started = False
    if not ray.is_initialized():
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=cfg.num_processes, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=2)(write_shard)
        refs = {remote.remote(t): t for t in pending}
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            yield refs[done[0]], ray.get(done[0])
    finally:
        if started:
            ray.shutdown()


class _Progress:
    """tqdm bar in input rows, with images written per second in the postfix."""

    def __init__(self, total: int, *, enabled: bool):
        self.bar = None
        self.images = 0
        self.t0 = time.monotonic()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="rows", desc="shards", file=sys.stderr, dynamic_ncols=True)

    def update(self, rows: int, images: int) -> None:
        self.images += images
        if self.bar is not None:
            self.bar.update(rows)
            rate = self.images / max(time.monotonic() - self.t0, 1e-9)
            self.bar.set_postfix(images=self.images, images_per_s=f"{rate:.1f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# Finish: skipped.jsonl and manifest.json


def _finish(out: Path, cfg: BuildConfig, resolved: dict, inputs: list[dict], fingerprint: str, vocab: Vocabulary,
            all_stats: list[dict]) -> dict:
    skipped_rows = sorted((s for st in all_stats for s in st["skipped_rows"]), key=lambda s: s["row"])
    atomic_write_text(out / SKIPPED_NAME, "".join(
        json.dumps(s, sort_keys=True, ensure_ascii=False) + "\n" for s in skipped_rows))
    reasons: dict[str, int] = {}
    for s in skipped_rows:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    rows = all_stats[-1]["rows"][1] if all_stats else 0
    written = sum(s["samples"] for s in all_stats)
    labeled = sum(s["labeled"] for s in all_stats)
    manifest = {
        "inputs": inputs,
        # the manifest lives in `out`, and overwrite/progress do not shape it: left out, so a resumed
        # or re-run build writes the same manifest bytes
        "config": {k: v for k, v in resolved.items() if k not in MANIFEST_OMITS},
        "fingerprint": fingerprint,
        "counts": {"rows": rows, "written": written, "labeled": labeled, "unlabeled": written - labeled,
                   "skipped": dict(sorted(reasons.items()))},
        "classes": len(vocab),
        "shards": [{"name": f"{SHARDS_DIR}/{s['shard']}", "samples": s["samples"], "labeled": s["labeled"],
                    "sha256": s["sha256"], "bytes": s["bytes"], "rows": s["rows"],
                    "sqrt_weight": s.get("sqrt_weight", 0.0)}
                   for s in all_stats if s["samples"]],
    }
    write_manifest(out, manifest)
    return json.loads(dumps_json({"schema": 1, **manifest}))


def _print_summary(manifest: dict, vocab: Vocabulary, *, resumed: int, t_text: float, t_images: float) -> None:
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
    table.add_row("pass 1 (text, incl. WordNet load)", f"{t_text:.1f} s")
    table.add_row("pass 2 (images)", f"{t_images:.1f} s, {c['written'] / max(t_images, 1e-9):.1f} images/s")
    if len(vocab):
        top = ", ".join(f"{n.split('.')[0]} ({k})" for n, k in zip(vocab.names[:5], vocab.counts[:5]))
        table.add_row("top classes", top)
    Console(stderr=True).print(table)
