"""maws_data.hashtags: hand-written edge cases, and the batch path against the per-caption one on real tweets."""

from pathlib import Path

import polars as pl
import pytest
from maws_data.hashtags import extract_hashtags, extract_hashtags_batch, extract_hashtags_series

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TWEETS = SHARED / "text" / "tweets_emoji_train_text.txt"


@pytest.fixture(scope="module")
def tweets() -> list[str]:
    if not TWEETS.exists():
        pytest.skip(f"real tweets not found at {TWEETS}")
    return TWEETS.read_text(encoding="utf-8").split("\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see http://example.org/page#fragment #real", ["real"]),
        ("https://x.org/#a,#b and www.example.com/#c", []),
        ("write to john#doe@example.com or #ask", ["ask"]),
        ("#a#b", ["a", "b"]),
        ("#Trunks#WestHollywood#WeHo", ["trunks", "westhollywood", "weho"]),
        ("#café!", ["café"]),
        ("#日本 #ไทย #हिन्दी", ["日本", "ไทย", "हिन्दी"]),
        ("#sunset🌅 #beach❤️ #friends\ufe0f", ["sunset", "beach", "friends"]),
        ("#Hello #hello #HELLO", ["hello"]),
        ("#Straße #STRASSE", ["strasse"]),  # casefold: ß -> ss, so one tag
        ("＃Ｆｕｌｌ #ﬁsh", ["full", "fish"]),  # full-width hash and letters, ligature: NFKC
        ("Netflix#lit &#39; C#", []),  # '#' after a letter or '&' starts no tag
        ("(#paren) ,#comma ##double", ["paren", "comma", "double"]),
        ("#1 #2019 #x2 #__", ["x2"]),  # a tag needs a letter
        ("#snake_case #mom's #rock'n'roll", ["snake_case", "mom", "rock"]),
        (None, []),
        ("", []),
        ("no tags here", []),
    ],
)
def test_edge_cases(text, expected):
    assert extract_hashtags(text) == expected
    assert extract_hashtags_batch([text]) == [expected]


def test_batch_accepts_series_and_keeps_order_and_nulls():
    texts = pl.Series("caption", ["#b #a #b", None, "", "#c"], dtype=pl.String)
    out = extract_hashtags_series(texts)
    assert out.dtype == pl.List(pl.String)
    assert out.to_list() == [["b", "a"], [], [], ["c"]]
    assert extract_hashtags_batch(texts) == [["b", "a"], [], [], ["c"]]


def test_real_tweets_known_lines(tweets):
    # Lines read by hand: chains, a tag glued to a word, an HTML entity, emoji residue before '#'.
    assert extract_hashtags(tweets[236]) == ["sunday", "trunks", "westhollywood", "weho"]
    assert extract_hashtags(tweets[233]) == ["laesclavablanca"]  # "Netflix#lit" is not a tag
    assert extract_hashtags(tweets[455]) == []  # "Snow#gameofthrones"
    assert extract_hashtags(tweets[580]) == [
        "rurallife",
        "ruralamerica",
        "nevada",
        "lund",
        "basinandrange",
        "basin",
        "usa",
    ]  # "Summertime#rural" is glued; "#basin&amp;range" stops at '&'; "#usa #usa" deduped
    assert extract_hashtags(tweets[103]) == ["goldenbaby_franki", "myminime", "summertime"]


def test_batch_equals_per_caption_on_real_tweets(tweets):
    sample = tweets[:5000]
    expected = [extract_hashtags(t) for t in sample]
    assert extract_hashtags_batch(sample) == expected
    assert extract_hashtags_batch(pl.Series(sample)) == expected
    # the sample really exercises the extractor: many tags, many captions with none
    assert sum(map(len, expected)) > 5000
    assert sum(1 for tags in expected if not tags) > 1000


def test_batch_empty_inputs():
    assert extract_hashtags_batch([]) == []
    assert extract_hashtags_batch([None, "", "no tags"]) == [[], [], []]
    assert extract_hashtags_series(pl.Series([], dtype=pl.String)).dtype == pl.List(pl.String)


def test_hash_collision_falls_back_to_exact_codes(monkeypatch, tweets):
    # Every string hashing to the same value must still give exact results (the fallback path).
    monkeypatch.setattr(pl.Series, "hash", lambda self, seed=0: pl.Series([0] * len(self), dtype=pl.UInt64))
    sample = tweets[:300]
    assert extract_hashtags_batch(sample) == [extract_hashtags(t) for t in sample]


def _collide_index_hashes(monkeypatch):
    """Every text gets the same index hash (seed 0); the chunk table's second hash stays real."""
    real = pl.Series.hash

    def colliding(self, seed=0):
        return pl.Series([0] * len(self), dtype=pl.UInt64) if seed == 0 else real(self, seed)

    monkeypatch.setattr(pl.Series, "hash", colliding)


def _tag_sets(texts):
    """caption_tags' pairs as {caption: set of tag names}."""
    from maws_data.hashtags import caption_tags, tag_names

    caption, tag = caption_tags(pl.Series(texts, dtype=pl.String))
    out: dict[int, set] = {}
    for c, t in zip(caption.tolist(), tag_names(tag.tolist())):
        out.setdefault(c, set()).add(t)
    return out, caption


def test_caption_tags_are_each_captions_distinct_tags(monkeypatch, tweets):
    """Against the per-caption path, with a chunk table that fills, starts over, and is bypassed for
    a batch with more distinct chunks than it may hold: the table's size says which path ran."""
    from maws_data import hashtags

    monkeypatch.setattr(hashtags, "_chunks", [])  # a fresh chunk table
    monkeypatch.setattr(hashtags, "CHUNK_TABLE_MAX", 500)
    # tweets[:300] have 322 distinct chunks, [300:600] 365 (674 together), [:2000] 2,174
    for part, table_size in ((tweets[:300], 322), (tweets[300:600], 365), (tweets[:2000], 365)):
        got, caption = _tag_sets(part)
        want = {i: set(extract_hashtags(t)) for i, t in enumerate(part) if extract_hashtags(t)}
        assert got == want and len(want) > 100
        assert (caption[1:] >= caption[:-1]).all()  # grouped by caption
        assert len(hashtags._chunk_table().check) == table_size


def test_caption_tags_exact_when_chunk_hashes_collide(monkeypatch, tweets):
    from maws_data import hashtags

    monkeypatch.setattr(hashtags, "_chunks", [])
    _tag_sets(tweets[:200])  # the table holds real hashes
    _collide_index_hashes(monkeypatch)
    sample = tweets[200:500]
    got, _ = _tag_sets(sample)
    assert got == {i: set(extract_hashtags(t)) for i, t in enumerate(sample) if extract_hashtags(t)}


def _tag_lists(texts):
    from maws_data.hashtags import caption_tag_lists, tag_names

    offsets, ids = caption_tag_lists(pl.Series(texts, dtype=pl.String))
    names = tag_names(ids.tolist())
    return [names[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def test_caption_tag_lists_are_extract_hashtags_in_order(monkeypatch, tweets):
    """The image pass's labels: each caption's tags in first-occurrence order (a set would pass
    caption_tags' test, not this one), through a table that fills and starts over, and on a collision."""
    from maws_data import hashtags

    monkeypatch.setattr(hashtags, "_chunks", [])
    monkeypatch.setattr(hashtags, "CHUNK_TABLE_MAX", 500)
    reordered = ["#b #a #b", "#c#a #A", None, "", "#x #y #x #z"]
    assert _tag_lists(reordered) == [["b", "a"], ["c", "a"], [], [], ["x", "y", "z"]]
    for part in (tweets[:300], tweets[300:600], tweets[:2000]):
        assert _tag_lists(part) == [extract_hashtags(t) for t in part]
    _collide_index_hashes(monkeypatch)
    assert _tag_lists(tweets[600:900]) == [extract_hashtags(t) for t in tweets[600:900]]


def test_tag_list_outputs_match_mine_series(tweets):
    """Each caption's outputs (several per tag, shared between tags, tags without any) in tag order,
    once each: the same lists as mine_series' per-tag column."""
    from maws_data.hashtags import caption_tag_lists, distinct_tags, mine_series, tag_list_outputs

    texts = pl.Series(tweets[:1500] + ["#love #me #love", None], dtype=pl.String)
    lookup = {t: (f"w{len(t) % 7}", f"w{len(t) % 3}") if len(t) % 5 else () for t in distinct_tags(texts)}
    offsets, ids = caption_tag_lists(texts)
    out_off, outs, names = tag_list_outputs(offsets, ids, lookup)
    got = [[names[o] for o in outs[a:b]] for a, b in zip(out_off[:-1].tolist(), out_off[1:].tolist())]
    want = mine_series(texts, {"wnids": lambda t: lookup.get(t, ())})["wnids"].to_list()
    assert got == want and got[-2] == ["w4", "w1", "w2"] and got[-1] == []
    assert sum(map(len, got)) > 1000


def test_hash_index_finds_every_key_through_probes_and_growth():
    """`_HashIndex` against a dict: keys that share their low bits (the same slot: long probe chains),
    0 and 2^64-1 as keys, absent keys (-1), and growth from 1,024 slots while ids are added."""
    import numpy as np
    from maws_data.hashtags import _HashIndex

    rng = np.random.default_rng(7)
    index, want = _HashIndex(), {}
    same_slot = (np.arange(1, 40, dtype=np.uint64) << np.uint64(40)) | np.uint64(5)  # low 40 bits equal
    batches = [same_slot, np.array([0, 2**64 - 1], np.uint64)] + [
        np.unique(rng.integers(0, 2**64, 3000, dtype=np.uint64)) for _ in range(6)]
    for keys in batches:
        keys = np.array([k for k in keys.tolist() if k not in want], np.uint64)
        ids = np.arange(len(want), len(want) + len(keys))
        index.add(keys, ids)
        want.update(zip(keys.tolist(), ids.tolist()))
        probe = np.concatenate([np.array(list(want), np.uint64), rng.integers(0, 2**64, 1000, dtype=np.uint64),
                                same_slot + np.uint64(1 << 39)])  # absent, and one that lands in the chain
        assert index.find(probe).tolist() == [want.get(k, -1) for k in probe.tolist()]
    assert len(index.keys) >= 2 * len(want) > 1024  # grew, and stays at most half full
