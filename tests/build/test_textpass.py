"""The parallel text pass on all 2,261 real Instagram captions (images left out: only the text matters
here): 1 and 2 processes, many units, give the vocabulary and hashtag map of the single-frame reference
(every row in one polars frame, as the builder did before it streamed); the mapping cache maps each tag once."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from maws_data.build import BuildConfig, build
from maws_data.hashtags import extract_hashtags_batch
from maws_data.textpass import map_tags
from maws_data.vocab import build_vocabulary, hashtag_map_frame, row_synsets, tag_frame
from maws_data.wordnet import HashtagMapper, MappingConfig, synset_name

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CAPTIONS = SHARED_DATA / "instagram" / "captions.parquet"


@pytest.fixture(scope="module")
def text_source(tmp_path_factory) -> Path:
    """The real captions over 3 files, with a repeated key and null captions sprinkled in."""
    if not CAPTIONS.is_file():
        pytest.skip(f"real data not found at {CAPTIONS}")
    df = pl.read_parquet(CAPTIONS).select("key", "caption").with_columns(pl.lit("nowhere/x.jpg").alias("image"))
    df = df.with_columns(pl.when(pl.int_range(pl.len()) % 97 == 5).then(None).otherwise(pl.col("caption")).alias("caption"),
                         pl.when(pl.int_range(pl.len()) == 1500).then(pl.lit(df["key"][3])).otherwise(pl.col("key")).alias("key"))
    folder = tmp_path_factory.mktemp("text_source")
    for i, (a, b) in enumerate([(0, 700), (700, 1600), (1600, df.height)]):
        df.slice(a, b - a).write_parquet(folder / f"part-{i}.parquet")
    return folder


def reference(folder: Path, min_count: int) -> tuple[str, str]:
    """vocabulary.tsv and hashtag_map.tsv computed the old way: every row in one frame, one process."""
    df = pl.concat([pl.read_parquet(p) for p in sorted(folder.glob("*.parquet"))]).with_row_index("row")
    usable = df.filter(pl.col("key").is_first_distinct())  # row 1500 repeats row 3's key
    tags = extract_hashtags_batch(usable["caption"].to_list())
    row_tags = pl.DataFrame({"row": usable["row"], "hashtags": tags}, schema={"row": pl.UInt32,
                                                                                "hashtags": pl.List(pl.String)})
    mapper = HashtagMapper(MappingConfig())
    distinct = sorted({t for ts in tags for t in ts})
    explained = {t: mapper.explain(t) for t in distinct}
    frame = tag_frame({t: e[0] for t, e in explained.items()}, {t: e[1] for t, e in explained.items()})
    vocab = build_vocabulary(row_tags, row_synsets(row_tags, frame), frame, min_count=min_count, max_classes=None,
                             synset_name=synset_name)
    return vocab.to_frame().write_csv(separator="\t"), hashtag_map_frame(row_tags, frame).write_csv(separator="\t")


def test_one_and_two_processes_equal_the_single_frame_reference(text_source, tmp_path):
    want_vocab, want_map = reference(text_source, min_count=3)
    assert want_vocab.count("\n") > 100
    common = {"source": str(text_source), "image_size": 64, "shard_size": 50, "min_count": 3, "decoder": "pil",
              "progress": False, "text_unit_rows": 200}  # 12+ text units over 3 files
    one = build(BuildConfig(out=str(tmp_path / "one"), processes=1, mapping_cache="", **common))
    two = build(BuildConfig(out=str(tmp_path / "two"), processes=2, mapping_cache=str(tmp_path / "cache"), **common))
    # warm: every tag is in the cache, so the scan round counts, and the unit holding the duplicate
    # key is counted again to subtract it
    warm = build(BuildConfig(out=str(tmp_path / "warm"), processes=2, mapping_cache=str(tmp_path / "cache"), **common))
    # partly warm: the cache knows the tags of the first file only
    build(BuildConfig(**{**common, "source": str(text_source / "part-0.parquet")}, out=str(tmp_path / "first"),
                      processes=1, mapping_cache=str(tmp_path / "part-cache")))
    part = build(BuildConfig(out=str(tmp_path / "part"), processes=1, mapping_cache=str(tmp_path / "part-cache"),
                             **common))
    for out in (one, two, warm, part):
        assert (out / "vocabulary.tsv").read_text() == want_vocab
        assert (out / "hashtag_map.tsv").read_text() == want_map
    m = __import__("json").loads((one / "manifest.json").read_text())
    assert m["counts"]["skipped"] == {"duplicate_key": 1, "missing_path": 2260}
    assert m["counts"]["written"] == 0 and m["counts"]["rows"] == 2261


def _as_dict(mapping) -> dict:
    """map_tags' frame as {tag: (wnids, rule)}."""
    return {h: (tuple(w), r) for h, w, r in mapping.iter_rows()}


def test_mapping_cache_maps_each_tag_once(tmp_path):
    tags = {"dog", "dogs", "sunsetbeach", "instagood", "petstagram", "zzqqxx"}
    cfg = MappingConfig()
    first, mapped = map_tags(tags, cfg, str(tmp_path))
    first = _as_dict(first)
    assert mapped == len(tags)
    again, mapped = map_tags(tags | {"cat"}, cfg, str(tmp_path))
    again = _as_dict(again)
    assert mapped == 1  # only the new tag
    assert {t: again[t] for t in tags} == first
    assert first["dog"] == (("n02084071",), "lemma") and first["instagood"] == ((), "stopword")
    # another mapping configuration has a cache of its own
    _, mapped = map_tags(tags, MappingConfig(ambiguity="skip"), str(tmp_path))
    assert mapped == len(tags)
    assert map_tags(tags, cfg, "")[1] == len(tags)  # "" turns the cache off


def test_mapping_also_caches_synset_names(tmp_path, monkeypatch):
    """A warm build names its synsets from the cache even when larger counts lift a synset over
    min_count that no earlier build kept: map_tags caches the name of every synset it maps to."""
    from maws_data import textpass, wordnet

    mapping, _ = map_tags({"dog", "sunsetbeach", "instagood"}, MappingConfig(), str(tmp_path))
    wnids = {w for ws, _ in _as_dict(mapping).values() for w in ws}
    assert "n02084071" in wnids
    monkeypatch.setattr(wordnet, "synset_name", lambda w: pytest.fail(f"WordNet asked for {w}"))
    names = textpass.synset_names(wnids, MappingConfig(), str(tmp_path))
    assert names["n02084071"] == "dog.n.01" and set(names) == wnids


@pytest.mark.parametrize("tag_table_max", [1 << 20, 300])  # 300: the process renumbers its tags between calls
def test_known_counts_rows_per_cached_tag_and_synset_as_a_plain_count_does(monkeypatch, tag_table_max):
    """`Known.count` (the warm scan's integer path) against counting each caption's tag and synset
    sets in Python, on the real captions, in two halves: the second half's tags were numbered by the
    first call (ids are per process) or, with a small tag table, renumbered from scratch; a tag
    outside the cache makes it return the tags instead."""
    from maws_data import hashtags
    from maws_data.hashtags import extract_hashtags, tag_generation
    from maws_data.textpass import Known

    monkeypatch.setattr(hashtags, "TAG_TABLE_MAX", tag_table_max)
    generation = tag_generation()
    if not CAPTIONS.is_file():
        pytest.skip(f"real data not found at {CAPTIONS}")
    captions = pl.read_parquet(CAPTIONS)["caption"]
    lists = [extract_hashtags(c) for c in captions.to_list()]
    all_tags = sorted({t for ts in lists for t in ts})
    # a made-up mapping with tags of 0, 1 and 2 synsets, some shared
    wnids = [tuple(f"n{(i * 7 + k) % 50:08d}" for k in range(i % 3)) for i in range(len(all_tags))]
    known = Known.of(all_tags, wnids)
    lookup = dict(zip(all_tags, wnids))
    for part in (slice(0, 1000), slice(1000, None)):
        got, missing = known.count(captions[part])
        assert missing == []
        tag_rows, synset_rows = {}, {}
        for ts in lists[part]:
            for t in ts:
                tag_rows[t] = tag_rows.get(t, 0) + 1
            for w in {w for t in ts for w in lookup[t]}:
                synset_rows[w] = synset_rows.get(w, 0) + 1
        index, rows = got["tags"]
        assert dict(zip([all_tags[i] for i in index.tolist()], rows.tolist())) == tag_rows
        index, rows = got["synsets"]
        assert dict(zip([known.synsets[j] for j in index.tolist()], rows.tolist())) == synset_rows
        assert len(synset_rows) > 30 and max(synset_rows.values()) > 1

    partial = Known.of(all_tags[1:], wnids[1:])  # the cache lacks one tag
    got, tags = partial.count(captions)
    assert got is None and sorted(tags) == all_tags
    assert (tag_generation() > generation) == (tag_table_max == 300)


def test_first_distinct_on_hashes_equals_polars_exact_one():
    """The keys round's `_first_distinct` (hashes first, exact over repeated hashes) against polars'
    exact `is_first_distinct`, on the real keys with repeats planted before and after their first use."""
    from maws_data.textpass import _first_distinct

    if not CAPTIONS.is_file():
        pytest.skip(f"real data not found at {CAPTIONS}")
    keys = pl.read_parquet(CAPTIONS)["key"]
    assert _first_distinct(keys).all()
    mixed = pl.concat([keys.slice(0, 500), keys.slice(100, 50), keys.slice(500, None), keys.slice(0, 3),
                       keys.slice(2000, 1)])
    want = mixed.is_first_distinct()
    assert (~want).sum() == 54
    assert _first_distinct(mixed).to_list() == want.to_list()


def test_many_new_tags_are_mapped_on_the_runner(text_source, tmp_path, monkeypatch):
    """Past MAP_MIN_TAGS new tags, the mapping round maps them (and names their synsets) on the
    workers: the driver never touches WordNet, and the vocabulary is the reference's."""
    from maws_data import textpass, wordnet

    want_vocab, want_map = reference(text_source, min_count=3)
    monkeypatch.setattr(textpass, "MAP_MIN_TAGS", 1)
    monkeypatch.setattr(textpass, "MAP_TASK_TAGS", 700)  # ~7 tasks over the sample's tags
    tasks = []
    from maws_data import runner as runner_mod

    real_map = runner_mod.Runner.map

    def spy(self, fn, items, **kw):
        items = list(items)
        if fn is textpass.map_chunk:
            tasks.extend(items)
        return real_map(self, fn, items, **kw)

    monkeypatch.setattr(runner_mod.Runner, "map", spy)
    renewed = []
    real_renew = runner_mod.Runner.renew
    monkeypatch.setattr(runner_mod.Runner, "renew", lambda self: (renewed.append(len(tasks)), real_renew(self)))
    monkeypatch.setattr(wordnet, "HashtagMapper", lambda *a: pytest.fail("the driver mapped a tag"))
    monkeypatch.setattr(wordnet, "synset_name", lambda w: pytest.fail(f"the driver named {w}"))
    out = build(BuildConfig(source=str(text_source), out=str(tmp_path / "out"), image_size=64, shard_size=50,
                            min_count=3, decoder="pil", progress=False, processes=2,
                            mapping_cache=str(tmp_path / "cache")))
    assert (out / "vocabulary.tsv").read_text() == want_vocab
    assert (out / "hashtag_map.tsv").read_text() == want_map
    n_tags = sum(len(t.tags) for t in tasks)
    assert len(tasks) >= 5 and n_tags == len({t for task in tasks for t in task.tags}) > 3000
    assert renewed == [len(tasks)]  # the workers that loaded WordNet were replaced after the round


def test_tags_a_worker_cannot_map_are_mapped_in_the_driver(text_source, tmp_path, monkeypatch, capfd):
    """Workers whose NLTK_DATA holds no WordNet (a Ray node without it) hand their tags back."""
    from maws_data import textpass
    from maws_data.wordnet import load_wordnet

    load_wordnet()  # this process has WordNet; the workers started below will not
    want_vocab, want_map = reference(text_source, min_count=3)
    monkeypatch.setattr(textpass, "MAP_MIN_TAGS", 1)
    monkeypatch.setattr(textpass, "MAP_TASK_TAGS", 2000)
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "no-wordnet"))
    out = build(BuildConfig(source=str(text_source), out=str(tmp_path / "out"), image_size=64, shard_size=50,
                            min_count=3, decoder="pil", progress=False, processes=2,
                            mapping_cache=str(tmp_path / "cache")))
    assert (out / "vocabulary.tsv").read_text() == want_vocab
    assert (out / "hashtag_map.tsv").read_text() == want_map
    err = capfd.readouterr().err
    assert "new hashtags are mapped in the driver: a worker could not load WordNet" in err


def test_a_broken_mapping_cache_is_mapped_again_and_rewritten(tmp_path):
    from maws_data.textpass import _cache_path, load_mapping_cache

    cfg = MappingConfig()
    map_tags({"dog", "instagood"}, cfg, str(tmp_path))
    path = _cache_path(cfg, str(tmp_path))
    assert load_mapping_cache(cfg, str(tmp_path))["hashtag"].to_list() == ["dog", "instagood"]
    path.write_bytes(b"not parquet")
    mapping, mapped = map_tags({"dog", "cat"}, cfg, str(tmp_path))
    assert mapped == 2 and _as_dict(mapping)["dog"] == (("n02084071",), "lemma")
    assert load_mapping_cache(cfg, str(tmp_path))["hashtag"].to_list() == ["cat", "dog"]
