"""Stage 4 of the build, the image pass: one task per shard, run on the runner's workers.

A task is a small record (which rows of which file, where the build lives); the worker reads its
own rows from the source, decides each row's fate exactly as the text pass did
(`textpass.row_checks`, plus the keys round's duplicates and renamed keys), labels the usable rows
from the vocabulary (a tag -> kept synsets table, read once per worker process), and hands them to
`maws_data.shards.write_shard`, which fetches, decodes and writes the shard and its commit marker.

Memory (worker): one shard's rows and images, the tag -> kept synsets table, and the chunk and tag
tables the labels are mined with (`hashtags.caption_tag_lists`: bounded by CHUNK_TABLE_MAX chunks
and TAG_TABLE_MAX tags, as in the text pass).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import polars as pl

from maws_data import storage
from maws_data.hashtags import caption_tag_lists, tag_list_outputs, tag_names
from maws_data.images import ImageConfig
from maws_data.manifest import read_bytes, write_bytes
from maws_data.plan import Span
from maws_data.shards import ShardRow, ShardTask, shard_stem, write_shard
from maws_data.sources import SourceConfig, SourceFile, read_rows
from maws_data.textpass import exceptions_for, row_checks, safe_keys
from maws_data.vocab import Vocabulary

LABELS_NAME = "labels.parquet"
SHARDS_DIR = "shards"


@dataclass(frozen=True)
class ShardJob:
    index: int
    file: SourceFile
    span: Span
    source: SourceConfig
    out: str  # the build folder / prefix
    work: str
    buckets: int
    exceptions: bool  # whether the keys round found duplicates or renamed keys
    image: ImageConfig  # decoder already resolved to "pil" or "dali"
    dali_device: str
    fingerprint: str
    threads: int
    dedup_dir: str | None = None  # the dedup table folder (unit files), None with --dedup none
    eval_index: str | None = None  # the saved eval index (--decontaminate)
    eval_threshold: int = 6

    @property
    def rows(self) -> int:
        return self.span.rows

    def name(self) -> str:
        return f"{shard_stem(self.index)} ({self.file.url} rows {self.span.first}..{self.span.end})"


def write_labels(work: str, vocab: Vocabulary, tags: pl.DataFrame) -> None:
    """The workers' label table: every tag that maps to a kept class -> its kept synsets (mapper
    order), sorted by hashtag. `tags`: hashtag, wnids (every distinct tag of the build)."""
    kept = pl.Series("wnid", vocab.wnids, dtype=pl.String).implode()
    table = (tags.select("hashtag", pl.col("wnids").alias("wnid")).with_row_index("_tag")
             .explode("wnid").filter(pl.col("wnid").is_in(kept))
             .group_by("_tag", maintain_order=True).agg(pl.col("hashtag").first(), pl.col("wnid").alias("wnids"))
             .sort("hashtag").select("hashtag", "wnids"))
    buf = io.BytesIO()
    table.write_parquet(buf)
    write_bytes(storage.join(work, LABELS_NAME), buf.getvalue(), durable=False)  # rebuilt by every run's text pass


_labels: dict = {}


def _label_table(job: ShardJob) -> tuple[dict[str, tuple[str, ...]], dict[str, int], tuple[int, ...]]:
    key = (job.work, job.fingerprint)
    if key not in _labels:
        _labels.clear()
        df = pl.read_parquet(io.BytesIO(read_bytes(storage.join(job.work, LABELS_NAME))))
        voc = pl.read_csv(io.BytesIO(read_bytes(storage.join(job.out, "vocabulary.tsv"))), separator="\t",
                          schema_overrides={"wnid": pl.String, "name": pl.String, "hashtags": pl.String})
        wnids = voc["wnid"].to_list()
        _labels[key] = (dict(zip(df["hashtag"].to_list(), map(tuple, df["wnids"].to_list()))),
                        {w: i for i, w in enumerate(wnids)}, tuple(int(c) for c in voc["count"]))
    return _labels[key]


def _labels_of(captions: pl.Series, kept: dict[str, tuple[str, ...]], index: dict[str, int]
               ) -> tuple[list[list[str]], list[list[str]], list[list[int]]]:
    """Per caption (null: none): its hashtags, its kept synsets (in tag order, once each) and their
    vocabulary indexes. Mined with the worker's chunk table (`caption_tag_lists`), which it keeps
    from shard to shard: a chunk is parsed once per worker, not once per shard."""
    tag_off, tag_ids = caption_tag_lists(captions)
    out_off, out_ids, out_names = tag_list_outputs(tag_off, tag_ids, kept)
    tags, outs = tag_names(tag_ids.tolist()), out_ids.tolist()
    names = [out_names[o] for o in outs]
    class_of = [index[w] for w in names]
    tag_off, out_off = tag_off.tolist(), out_off.tolist()
    spans = range(len(captions))
    return ([tags[tag_off[i]:tag_off[i + 1]] for i in spans], [names[out_off[i]:out_off[i + 1]] for i in spans],
            [class_of[out_off[i]:out_off[i + 1]] for i in spans])


def run_shard(job: ShardJob) -> dict:
    """Build one shard; returns its stats without the per-row skip list (that stays in its JSON)."""
    df = row_checks(read_rows(job.file, job.source, job.span.first, job.span.end, byte_range=job.span.byte_range),
                    job.span.row0)
    df = df.with_columns(pl.lit(None, pl.String).alias("new_key"))
    if job.exceptions:
        ex = exceptions_for(job.work, job.buckets, job.span.row0, job.span.row0 + job.span.rows)
        if ex.height:
            df = df.join(ex.rename({"reason": "x_reason", "key": "x_key", "detail": "x_detail"}), on="row",
                         how="left", maintain_order="left")
            df = df.with_columns(pl.coalesce("reason", "x_reason").alias("reason"),
                                 pl.coalesce("detail", "x_detail").alias("detail"),
                                 pl.col("x_key").alias("new_key"))
    usable = pl.col("reason").is_null()
    captions = df.select(pl.when(usable).then(pl.col("caption"))).to_series()
    kept, index, counts = _label_table(job)
    hashtags, wnids, labels = _labels_of(captions, kept, index)
    safe = safe_keys(df["key"].fill_null(""))
    keys = df.select(pl.coalesce(pl.col("new_key"), safe)).to_series()
    rows, skipped = [], []
    for i, (row, src_key, key, image, caption, reason, detail) in enumerate(zip(
            df["row"].to_list(), df["key"].to_list(), keys.to_list(), df["image"].to_list(), df["caption"].to_list(),
            df["reason"].to_list(), df["detail"].to_list())):
        if reason is not None:
            skipped.append({"row": row, "key": src_key, "reason": reason, "detail": detail})
            continue
        rows.append(ShardRow(row=row, key=key, source_key=src_key, image=image, base_dir=job.file.base_dir,
                             caption=caption, hashtags=hashtags[i], wnids=wnids[i], labels=labels[i]))
    stats = write_shard(ShardTask(index=job.index, first_row=job.span.row0, end_row=job.span.row0 + job.span.rows,
                                  rows=rows, skipped=skipped, shards_dir=storage.join(job.out, SHARDS_DIR),
                                  image=job.image, dali_device=job.dali_device, fingerprint=job.fingerprint,
                                  threads=job.threads, class_counts=counts, dedup_dir=job.dedup_dir,
                                  eval_index=job.eval_index, eval_threshold=job.eval_threshold))
    return {k: v for k, v in stats.items() if k != "skipped_rows"}
