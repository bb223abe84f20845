"""The label vocabulary: images per WordNet synset -> `vocabulary.tsv` and `hashtag_map.tsv`.

Input (pass 1 of the build, text only): each usable row's hashtags, and each distinct hashtag's
synsets (mapped once by `maws_data.wordnet`). A row counts once for every synset any of its tags
maps to. Kept classes: synsets with at least `min_count` images, the `max_classes` most frequent of
them; index order is count descending, then wnid ascending (so ties are broken the same way on
every machine).

vocabulary.tsv   index  wnid  name  count  hashtags
                 one row per class in index order; `name` is the synset name ("golden_retriever.n.01"),
                 `count` the number of input rows mapped to it, `hashtags` the space-separated tags
                 that mapped to it, most frequent first.
hashtag_map.tsv  hashtag  count  wnids  rule
                 every distinct hashtag seen (mapped or not): rows containing it, its synsets
                 (space-separated, empty when unmapped) and the mapping rule that decided
                 (e.g. "lemma", "stoplist", "unmapped"); most frequent first, then by hashtag.

Both are tab-separated with a header, written with polars (fields are quoted only if they contain
a tab, quote or newline, which hashtags and synset names never do).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from maws_data.manifest import atomic_write_text

VOCABULARY_NAME = "vocabulary.tsv"
HASHTAG_MAP_NAME = "hashtag_map.tsv"


@dataclass(frozen=True)
class Vocabulary:
    """The classes of a build, in label-index order."""

    wnids: tuple[str, ...]
    names: tuple[str, ...]
    counts: tuple[int, ...]
    hashtags: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.wnids)

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """wnid -> label index."""
        return {w: i for i, w in enumerate(self.wnids)}

    @classmethod
    def load(cls, build_dir: str | Path) -> Vocabulary:
        """Read `build_dir/vocabulary.tsv` (or the .tsv file itself)."""
        path = Path(build_dir)
        if path.is_dir():
            path = path / VOCABULARY_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no vocabulary.tsv; run `maws-data build` first")
        df = pl.read_csv(path, separator="\t", schema_overrides={"wnid": pl.String, "name": pl.String,
                                                                  "hashtags": pl.String})
        if df["index"].to_list() != list(range(df.height)):
            raise ValueError(f"{path}: column 'index' must be 0..{df.height - 1} in order")
        return cls(wnids=tuple(df["wnid"]), names=tuple(df["name"]), counts=tuple(int(c) for c in df["count"]),
                   hashtags=tuple(tuple((h or "").split()) for h in df["hashtags"]))

    def to_frame(self) -> pl.DataFrame:
        return pl.DataFrame({
            "index": list(range(len(self))),
            "wnid": list(self.wnids),
            "name": list(self.names),
            "count": list(self.counts),
            "hashtags": [" ".join(h) for h in self.hashtags],
        }, schema={"index": pl.Int64, "wnid": pl.String, "name": pl.String, "count": pl.Int64,
                   "hashtags": pl.String})

    def save(self, build_dir: str | Path) -> Path:
        path = Path(build_dir) / VOCABULARY_NAME
        atomic_write_text(path, self.to_frame().write_csv(separator="\t"))
        return path


def tag_frame(tag_wnids: dict[str, list[str]], tag_rules: dict[str, str] | None = None) -> pl.DataFrame:
    """The mapping of distinct tags as a frame: hashtag, wnids (list), rule."""
    tags = sorted(tag_wnids)
    return pl.DataFrame({
        "hashtag": tags,
        "wnids": [list(tag_wnids[t]) for t in tags],
        "rule": [(tag_rules or {}).get(t, "") for t in tags],
    }, schema={"hashtag": pl.String, "wnids": pl.List(pl.String), "rule": pl.String})


def row_synsets(row_tags: pl.DataFrame, tags: pl.DataFrame) -> pl.DataFrame:
    """Per row (columns `row`, `hashtags` list) the ordered, de-duplicated synsets of its tags.

    Returns `row`, `wnids` (list[str]) for every input row, in input order (empty list when none):
    synsets appear in the order of the tags in the caption, then the mapper's order per tag.
    """
    pairs = (row_tags.select("row", pl.col("hashtags").alias("hashtag")).explode("hashtag")
             .with_row_index("_pos")
             .join(tags.select("hashtag", "wnids"), on="hashtag", how="inner")
             .sort("_pos")
             .explode("wnids").drop_nulls("wnids")
             .unique(["row", "wnids"], keep="first", maintain_order=True)
             .group_by("row", maintain_order=True).agg(pl.col("wnids")))
    out = row_tags.select("row").join(pairs, on="row", how="left", maintain_order="left")
    return out.with_columns(pl.col("wnids").fill_null(pl.lit([], dtype=pl.List(pl.String))))


def hashtag_counts(row_tags: pl.DataFrame) -> pl.DataFrame:
    """hashtag -> number of rows whose caption contains it (tags are already unique per caption)."""
    return (row_tags.select(pl.col("hashtags").alias("hashtag")).explode("hashtag").drop_nulls()
            .group_by("hashtag").len("count"))


def build_vocabulary(row_tags: pl.DataFrame, row_wnids: pl.DataFrame, tags: pl.DataFrame, *,
                     min_count: int, max_classes: int | None,
                     synset_name: Callable[[str], str]) -> Vocabulary:
    """Count rows per synset and keep the frequent ones (module docstring: the selection rule)."""
    counts = (row_wnids.select(pl.col("wnids").alias("wnid")).explode("wnid").drop_nulls()
              .group_by("wnid").len("count")
              .filter(pl.col("count") >= min_count)
              .sort(["count", "wnid"], descending=[True, False]))
    if max_classes is not None:
        counts = counts.head(max_classes)
    # which tags fed each kept synset, most frequent tag first
    tag_counts = hashtag_counts(row_tags)
    fed = (tags.select("hashtag", pl.col("wnids").alias("wnid")).explode("wnid").drop_nulls()
           .join(tag_counts, on="hashtag", how="inner")
           .sort(["count", "hashtag"], descending=[True, False])
           .group_by("wnid", maintain_order=True).agg(pl.col("hashtag")))
    by_wnid = dict(zip(fed["wnid"].to_list(), fed["hashtag"].to_list()))
    wnids = counts["wnid"].to_list()
    return Vocabulary(wnids=tuple(wnids), names=tuple(synset_name(w) for w in wnids),
                      counts=tuple(counts["count"].to_list()),
                      hashtags=tuple(tuple(by_wnid.get(w, [])) for w in wnids))


def hashtag_map_frame(row_tags: pl.DataFrame, tags: pl.DataFrame) -> pl.DataFrame:
    """The audit table: every distinct hashtag, how often, its synsets and the rule that decided."""
    return (tags.join(hashtag_counts(row_tags), on="hashtag", how="left")
            .select("hashtag", pl.col("count").fill_null(0).cast(pl.Int64),
                    # unmapped: an empty field (null), not a quoted empty string
                    pl.when(pl.col("wnids").list.len() > 0).then(pl.col("wnids").list.join(" ")).alias("wnids"),
                    "rule")
            .sort(["count", "hashtag"], descending=[True, False]))


def write_hashtag_map(build_dir: str | Path, frame: pl.DataFrame) -> Path:
    path = Path(build_dir) / HASHTAG_MAP_NAME
    atomic_write_text(path, frame.write_csv(separator="\t"))
    return path


def label_rows(row_wnids: pl.DataFrame, vocab: Vocabulary) -> pl.DataFrame:
    """Per row: `kept` (wnids in the vocabulary, caption order) and `labels` (their indices)."""
    index = vocab.index
    kept = [[w for w in ws if w in index] for ws in row_wnids["wnids"].to_list()]
    return pl.DataFrame({
        "row": row_wnids["row"],
        "kept": pl.Series(kept, dtype=pl.List(pl.String)),
        "labels": pl.Series([[index[w] for w in ws] for ws in kept], dtype=pl.List(pl.Int64)),
    })


# ---------------------------------------------------------------------------------------------
# The same two tables from merged counts (the build's parallel text pass): identical results to
# build_vocabulary / hashtag_map_frame above, which need every row in one frame.


def vocabulary_from_counts(synsets: pl.DataFrame, tags: pl.DataFrame, *, min_count: int,
                           max_classes: int | None, synset_name: Callable[[str], str]) -> Vocabulary:
    """`build_vocabulary` from rows per synset (`synsets`: wnid, count) and every distinct tag's
    rows and synsets (`tags`: hashtag, count, wnids), in polars: no Python object per tag."""
    kept = synsets.filter(pl.col("count") >= min_count).sort(["count", "wnid"], descending=[True, False])
    if max_classes is not None:
        kept = kept.head(max_classes)
    fed = (tags.filter(pl.col("count") > 0).sort(["count", "hashtag"], descending=[True, False])
           .select("hashtag", pl.col("wnids").list.unique(maintain_order=True).alias("wnid"))
           .explode("wnid").filter(pl.col("wnid").is_in(kept["wnid"].implode()))
           .group_by("wnid", maintain_order=True).agg(pl.col("hashtag")))
    by_wnid = dict(zip(fed["wnid"].to_list(), fed["hashtag"].to_list()))  # kept classes only
    wnids = kept["wnid"].to_list()
    return Vocabulary(wnids=tuple(wnids), names=tuple(synset_name(w) for w in wnids),
                      counts=tuple(kept["count"].to_list()), hashtags=tuple(tuple(by_wnid.get(w, ())) for w in wnids))


def hashtag_map_from_counts(tags: pl.DataFrame) -> pl.DataFrame:
    """`hashtag_map_frame` from every distinct tag's rows, synsets and rule (`tags`: hashtag,
    count, wnids, rule): the tags with a count, most frequent first."""
    return (tags.filter(pl.col("count") > 0).sort(["count", "hashtag"], descending=[True, False])
            .select("hashtag", pl.col("count").cast(pl.Int64),
                    # unmapped: an empty field (null), not a quoted empty string
                    pl.when(pl.col("wnids").list.len() > 0).then(pl.col("wnids").list.join(" ")).alias("wnids"),
                    "rule"))
