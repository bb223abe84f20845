"""Hashtag mining: free-text caption -> normalised hashtags (step 1 of `maws-data build`).

Rules (docs/hashtags.md has the full list with examples):

* A hashtag is `#` (or the full-width `＃`) followed by tag characters: letters, combining marks,
  decimal digits, connector punctuation (`_`) and the joiners ZWNJ/ZWJ that Indic and Persian
  scripts need. Any other character ends the tag, so trailing punctuation and emoji are dropped:
  `#café!` -> `café`, `#sunset🌅` -> `sunset`. Non-Latin scripts are kept: `#日本` -> `日本`.
* A `#` starts a tag only at the start of a whitespace-delimited chunk, after a character that is
  not a tag character (`(#tag)`, `,#tag`), or right where the previous tag ended (`#a#b` -> a, b).
  `foo#bar` and the HTML entity `&#39;` give nothing.
* Nothing inside a URL (`http://x.org/#frag`, `www.x.org/#frag`) or an e-mail address
  (`a#b@example.com`) counts.
* A tag needs at least one letter (`#1`, `#2019` are not tags, as on Twitter).
* Each tag is NFKC-normalised and case-folded; duplicates within a caption are removed, keeping the
  first occurrence's order. Tags are returned without the `#`.

Two entry points give identical results (tests/data/test_hashtags.py checks it on real tweets):
`extract_hashtags(text)` for one caption, and `extract_hashtags_batch(texts)`, the fast path the
builder uses: the chunking regex runs in Rust over the whole column (polars), and the Python rules
above run only once per DISTINCT chunk (cached), never once per caption.
"""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

# Whitespace spelled out, so that Python's `re` and polars' Rust `regex` agree exactly (their `\s`
# differ on U+001C..U+001F and U+0085). These are the Unicode White_Space characters.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_HASH = "#＃"
# A whitespace-delimited chunk that contains a hash sign. Leftmost-first matching makes the greedy
# prefix start at the chunk's first character, so the match is always the whole chunk in both engines.
CHUNK_PATTERN = f"[^{_WS}]*[{_HASH}][^{_WS}]*"
_CHUNK_RE = re.compile(CHUNK_PATTERN)

# URLs run to the end of their chunk (they cannot contain whitespace); a scheme or "www." starts one.
_URL_RE = re.compile(r"(?:\b[a-z][a-z0-9+.\-]*://|\bwww\.).*", re.IGNORECASE | re.DOTALL)
# RFC 5322 local-part characters (which include '#') @ a dotted domain.
_EMAIL_RE = re.compile(r"[\w.!#$%&'*+/=?^`{|}~\-]+@[\w\-]+(?:\.[\w\-]+)+")

_TAG_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Nd", "Nl", "Pc"})
_JOINERS = "\u200c\u200d"


@lru_cache(maxsize=1 << 16)
def _is_tag_char(ch: str) -> bool:
    if ch in _JOINERS:
        return True
    # Variation selectors are combining marks (Mn) but only style the emoji before them: a lone
    # U+FE0F after a tag (common in scraped tweets) must not become part of it.
    if "\ufe00" <= ch <= "\ufe0f" or "\U000e0100" <= ch <= "\U000e01ef":
        return False
    return unicodedata.category(ch) in _TAG_CATEGORIES


def normalise_tag(body: str) -> str:
    """NFKC + casefold (+ NFKC again: casefolding can leave a non-NFKC string), joiners trimmed.

    Returns "" for a body without a letter, which callers drop.
    """
    tag = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", body).casefold()).strip(_JOINERS)
    if not any(unicodedata.category(ch).startswith("L") for ch in tag):
        return ""
    return tag


@lru_cache(maxsize=1 << 20)
def chunk_tags(chunk: str) -> tuple[str, ...]:
    """Normalised hashtags of one whitespace-free chunk, in order (may repeat; callers dedupe).

    Cached: real captions repeat the same chunks (`#love`, `#travel`) over and over.
    """
    chunk = _EMAIL_RE.sub(" ", _URL_RE.sub(" ", chunk))
    tags: list[str] = []
    n = len(chunk)
    prev_end = -1  # index just past the body of the last tag that started, for chains like #a#b
    i = _next_hash(chunk, 0)
    while i != -1:
        j = i + 1
        while j < n and _is_tag_char(chunk[j]):
            j += 1
        before = chunk[i - 1] if i else ""
        if i == 0 or i == prev_end or (before != "&" and not _is_tag_char(before)):
            prev_end = j
            tag = normalise_tag(chunk[i + 1 : j])
            if tag:
                tags.append(tag)
        i = _next_hash(chunk, i + 1)
    return tuple(tags)


def _next_hash(s: str, start: int) -> int:
    a, b = s.find("#", start), s.find("＃", start)
    return b if a == -1 else a if b == -1 else min(a, b)


def extract_hashtags(text: str | None) -> list[str]:
    """Normalised hashtags of one caption, first-occurrence order, no duplicates, without '#'.

    >>> extract_hashtags("Golden hour #Sunset🌅 #beach,#SUNSET see http://x.org/#frag")
    ['sunset', 'beach']
    """
    if not text:
        return []
    out: dict[str, None] = {}
    for chunk in _CHUNK_RE.findall(text):
        for tag in chunk_tags(chunk):
            out.setdefault(tag)
    return list(out)


def extract_hashtags_series(texts: pl.Series | list[str | None]) -> pl.Series:
    """Vectorised `extract_hashtags`: a polars List[String] Series, one list per caption (nulls -> []).

    The chunk regex runs in Rust over the column; `chunk_tags` runs once per distinct chunk; the
    per-caption flatten + dedupe is integer work in numpy (`flat_map_distinct`).
    """
    return mine_series(texts)["hashtags"]


def mine_series(
    texts: pl.Series | list[str | None], per_tag: Mapping[str, Callable[[str], Sequence[str]]] | None = None
) -> pl.DataFrame:
    """Hashtags of every caption, plus one more List[String] column per `per_tag` function.

    `per_tag[name](tag)` turns one normalised tag into outputs (e.g. wnids); column `name` holds, per
    caption, the outputs of its tags in tag order without duplicates. All columns share one regex
    pass and one distinct-chunk table, so mapping costs little on top of mining.
    """
    import polars as pl

    s = texts if isinstance(texts, pl.Series) else pl.Series("text", texts, dtype=pl.String)
    chunks = s.cast(pl.String).str.extract_all(CHUNK_PATTERN)
    tags_of: dict[str, list[str]] = {}  # distinct chunk -> its tags, parsed once for every column

    def hashtags(chunk: str) -> list[str]:
        tags = tags_of[chunk] = chunk_tags(chunk)
        return tags

    fns: dict[str, Callable[[str], Sequence[str]]] = {"hashtags": hashtags}  # expanded first
    for name, fn in (per_tag or {}).items():
        fns[name] = functools.partial(_per_chunk, fn, tags_of)
    return pl.DataFrame(flat_map_distinct_many(chunks, fns))


def distinct_tags(texts: pl.Series) -> set[str]:
    """The set of hashtags over all captions: only the distinct chunks are parsed, no per-caption work."""
    import polars as pl

    chunks = texts.cast(pl.String).str.extract_all(CHUNK_PATTERN).explode().drop_nulls().unique()
    return {t for c in chunks.to_list() for t in chunk_tags(c)}


def mine_counts(texts: pl.Series, lookup: Mapping[str, Sequence[str]] | None = None, *, require_complete: bool = False
                ) -> tuple[list[str], dict[str, int] | None, dict[str, int] | None]:
    """(distinct hashtags, rows per hashtag, rows per output of `lookup[tag]`) over all captions.

    Counting only: no per-caption list is built. A caption counts once for every distinct tag in it
    and once for every distinct output its tags map to (a tag missing from `lookup` maps to nothing).
    With `require_complete`, the counts are None unless every tag is in `lookup` (the caller then
    counts later, once the missing tags are mapped). Without `lookup`, only the tags are returned.
    """
    import numpy as np

    urows, utags = caption_tags(texts)
    n_tags = max(len(_TAG_NAMES), 1)
    present = np.flatnonzero(np.bincount(utags, minlength=n_tags)) if len(utags) else utags
    tags = [_TAG_NAMES[i] for i in present]
    if lookup is None:
        return tags, None, None
    out_names, per_tag, known = _outputs_of(lookup)
    if require_complete and not known(present).all():
        return tags, None, None
    tag_counts = np.bincount(utags, minlength=n_tags)
    local = np.full(n_tags, -1, np.int64)
    local[present] = np.arange(len(present))
    out_rows, outs = _expand_ids(urows, local[utags], [per_tag(i) for i in present.tolist()])
    n_out = max(len(out_names), 1)
    uout = unique_grouped(out_rows * n_out + outs) % n_out
    out_counts = np.bincount(uout, minlength=n_out)
    return (tags, dict(zip(tags, tag_counts[present].tolist())),
            {out_names[i]: c for i, c in enumerate(out_counts.tolist()) if c})


def caption_tags(texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """Every (caption index, tag id) pair once, grouped by caption: the distinct hashtags of each
    caption as integers. Tag ids number the tags this process has met (`tag_names`), so a worker
    that counts unit after unit turns each distinct chunk into ids once, and callers count with numpy."""
    pair_rows, pair_tags = _tag_occurrences(texts)
    n_tags = max(len(_TAG_NAMES), 1)
    uniq = unique_grouped(pair_rows * n_tags + pair_tags)  # (caption, tag) once
    return uniq // n_tags, uniq % n_tags


def caption_tag_lists(texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """`extract_hashtags` of every caption as tag ids (`tag_names`): caption i's hashtags are
    ids[offsets[i]:offsets[i + 1]], in first-occurrence order, without repeats. The same chunk
    table as `caption_tags`, so a worker parses each distinct chunk once, not once per batch."""
    pair_rows, pair_tags = _tag_occurrences(texts)
    keep = first_occurrences(pair_rows * max(len(_TAG_NAMES), 1) + pair_tags)
    return _offsets(pair_rows[keep], len(texts)), pair_tags[keep]


def tag_list_outputs(offsets, ids, lookup: Mapping[str, Sequence[str]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The outputs of each caption's tags (`caption_tag_lists`): `lookup[tag]` for its tags in
    order, without repeats (a tag missing from `lookup` gives nothing). Returns (offsets, output ids,
    output names): caption i's outputs are names[o] for o in ids[offsets[i]:offsets[i + 1]]."""
    import numpy as np

    out_names, per_tag, _ = _outputs_of(lookup)
    present = np.unique(ids)
    local = np.zeros(max(len(_TAG_NAMES), 1), np.int64)
    local[present] = np.arange(len(present))
    rows = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
    out_rows, outs = _expand_ids(rows, local[ids], [per_tag(i) for i in present.tolist()])
    keep = first_occurrences(out_rows * max(len(out_names), 1) + outs)
    return _offsets(out_rows[keep], len(offsets) - 1), outs[keep], out_names


def _tag_occurrences(texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(caption index, tag id) of every tag occurrence, in caption order and, within a caption, in
    text order (repeats included)."""
    import numpy as np
    import polars as pl

    _bound_tag_table()
    chunks = texts.cast(pl.String).str.extract_all(CHUNK_PATTERN)
    n_items = chunks.list.len().fill_null(0).to_numpy().astype(np.int64)
    items = chunks.explode(empty_as_null=False, keep_nulls=False)
    if not len(items):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(n_items), dtype=np.int64), n_items)  # the caption of each chunk occurrence
    table = _chunk_table()
    codes = table.codes(items)
    if codes is not None:
        return expand_csr(rows, codes, *table.tag_ids)
    # two chunks share an index hash (the second hash told them apart): number this batch's chunks by their text
    codes, distinct = _distinct_codes(items)
    return _expand_ids(rows, codes, [_chunk_tag_ids(c) for c in distinct])


def first_occurrences(keys):
    """Mask of the first occurrence of each value in `keys` (values grouped by caption, so a stable
    sort is nearly linear: timsort runs, ~8x faster than hashing)."""
    import numpy as np

    first = np.ones(len(keys), dtype=bool)
    if len(keys) > 1:
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        first[order[1:][sorted_keys[1:] == sorted_keys[:-1]]] = False
    return first


def _offsets(rows, n: int):
    """CSR offsets (n + 1) of row ids that come sorted."""
    import numpy as np

    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
    return offsets


# The second hash's seed: any fixed value other than the index's (0).
CHECK_SEED = 0x9E3779B97F4A7C15
CHUNK_TABLE_MAX = 1 << 19  # distinct chunks a process keeps in _ChunkTable (~50 MB); past it, it starts over


class _HashIndex:
    """64-bit hash -> int id, in numpy arrays: open addressing with linear probing, at most half
    full. Lookups are a gather and a compare per round, ~10 ns an item warm, where `searchsorted`
    over the sorted hashes took ~100 ns (a branch-mispredicted binary search per item, even with
    the array in cache). Ids are >= 0 (-1 marks an empty slot, so any hash value, 0 too, is a key).
    Memory: 16 B a slot, 2-4 slots a key."""

    def __init__(self, bits: int = 10):
        import numpy as np

        self.mask = (1 << bits) - 1
        self.keys = np.zeros(1 << bits, np.uint64)
        self.ids = np.full(1 << bits, -1, np.int64)
        self.size = 0

    def find(self, h):
        """The id of each hash in `h` (uint64), -1 where it is absent."""
        import numpy as np

        slot = (h & np.uint64(self.mask)).astype(np.int64)
        out = self.ids[slot]
        open_ = np.flatnonzero((out >= 0) & (self.keys[slot] != h))  # a slot taken by another hash
        while len(open_):
            slot[open_] = (slot[open_] + 1) & self.mask
            out[open_] = self.ids[slot[open_]]
            go_on = (out[open_] >= 0) & (self.keys[slot[open_]] != h[open_])
            open_ = open_[go_on]
        return out

    def add(self, h, ids) -> None:
        """Insert hashes absent from the index (distinct) with their ids."""
        import numpy as np

        if 2 * (self.size + len(h)) > len(self.keys):  # grow to keep probes short, and re-insert all
            taken = np.flatnonzero(self.ids >= 0)
            old_h, old_ids = self.keys[taken], self.ids[taken]
            self.__init__((2 * (self.size + len(h)) - 1).bit_length())  # a power of 2 >= twice the keys
            self._insert(old_h, old_ids)
        self._insert(h, np.asarray(ids, np.int64))

    def _insert(self, h, ids) -> None:
        import numpy as np

        slot = (h & np.uint64(self.mask)).astype(np.int64)
        self.size += len(h)
        while len(h):  # each round fills every free slot asked for once; the rest probe on
            free = np.flatnonzero(self.ids[slot] < 0)
            _, first = np.unique(slot[free], return_index=True)
            win = free[first]
            self.keys[slot[win]], self.ids[slot[win]] = h[win], ids[win]
            rest = np.ones(len(h), bool)
            rest[win] = False
            h, ids, slot = h[rest], ids[rest], (slot[rest] + 1) & self.mask


class _ChunkTable:
    """Every distinct chunk this process has parsed, with its tag ids (`_chunk_tag_ids`), found by
    the 64-bit hash of its text (`_HashIndex`): a unit's ~80k chunk occurrences become chunk ids with
    no Python call each, and only chunks new to the process are parsed. Every found chunk is checked
    against a second 64-bit hash of the occurrence's text, with another seed (`CHECK_SEED`): a chunk
    is taken for another only if both hashes collide (~2^-128 a pair), and an index collision alone
    is caught (`codes` returns None; callers fall back to numbering by text). The check costs a
    hash, where comparing the texts cost a gather and a string compare of every occurrence (~15%
    of `caption_tags`), and the table keeps 8 B a chunk instead of its text.
    Memory: O(distinct chunks met), at most CHUNK_TABLE_MAX (then the table is emptied; tag ids stay)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        import numpy as np

        self.index = _HashIndex()  # chunk hash -> chunk id
        self.lens = np.zeros(0, np.int64)  # chunk id -> its tag ids: flat[starts[c]:starts[c] + lens[c]]
        self.flat = np.zeros(0, np.int64)
        self.starts = np.zeros(0, np.int64)
        self.check = np.zeros(0, np.uint64)  # chunk id -> the second hash of its text

    @property
    def tag_ids(self):
        return self.starts, self.lens, self.flat

    def codes(self, items: pl.Series):
        """The chunk id of every occurrence in `items` (parsing the new chunks); None on a hash
        collision, or when `items` alone holds more distinct chunks than the table may."""
        import numpy as np
        import polars as pl

        h = items.hash(seed=0).to_numpy()
        check = items.hash(seed=CHECK_SEED).to_numpy()
        codes = self.index.find(h)
        new = codes < 0
        if new.any():
            new_hashes, first = np.unique(h[new], return_index=True)
            if len(new_hashes) > CHUNK_TABLE_MAX:
                return None  # more distinct chunks than the table may hold
            if len(self.check) + len(new_hashes) > CHUNK_TABLE_MAX:
                self.clear()
                return self.codes(items)
            self._add(items.filter(pl.Series(new)).gather(first), new_hashes, check[new][first])
            codes = self.index.find(h)
        if not (self.check[codes] == check).all():
            return None
        return codes

    def _add(self, texts: pl.Series, new_hashes, new_checks) -> None:
        """Parse and insert chunks new to the table (their distinct hashes, their texts and second
        hashes in that order)."""
        import numpy as np

        # parsed without chunk_tags' cache: the table holds these chunks from now on, and the
        # cache would keep a second copy of each (~250 B) for nothing
        ids = [_chunk_tag_ids(t, parse=chunk_tags.__wrapped__) for t in texts.to_list()]
        lens = np.fromiter(map(len, ids), np.int64, len(ids))
        base = len(self.check)
        self.index.add(new_hashes, np.arange(base, base + len(ids)))
        self.starts = np.concatenate([self.starts, len(self.flat) + np.cumsum(lens) - lens])
        self.lens = np.concatenate([self.lens, lens])
        self.flat = np.concatenate([self.flat, np.fromiter(itertools.chain.from_iterable(ids), np.int64,
                                                           int(lens.sum()))])
        self.check = np.concatenate([self.check, new_checks])


_chunks: list[_ChunkTable] = []  # made on first use: importing this module imports no numpy or polars


def _chunk_table() -> _ChunkTable:
    if not _chunks:
        _chunks.append(_ChunkTable())
    return _chunks[0]


def tags_met() -> int:
    """How many tags this process has met: `caption_tags`' ids are 0 .. tags_met() - 1."""
    return len(_TAG_NAMES)


def tag_names(ids: Iterable[int]) -> list[str]:
    """The tags with these ids (`caption_tags`)."""
    return [_TAG_NAMES[i] for i in ids]


_outputs: dict[int, tuple] = {}


def _outputs_of(lookup: Mapping[str, Sequence[str]]):
    """(output names, tag id -> output ids, tag ids -> in lookup?) for one lookup table, memoised per
    process: a worker counts unit after unit against the same table."""
    import numpy as np

    key = id(lookup)
    if key not in _outputs or _outputs[key][0] is not lookup:
        names: list[str] = []
        ids: dict[str, int] = {}
        memo: dict[int, list[int]] = {}

        def out_id(w: str) -> int:
            i = ids.get(w)
            if i is None:
                i = ids[w] = len(names)
                names.append(w)
            return i

        def per_tag(tag_id: int) -> list[int]:
            hit = memo.get(tag_id)
            if hit is None:
                hit = memo[tag_id] = [out_id(w) for w in lookup.get(_TAG_NAMES[tag_id], ())]
            return hit

        flags = np.zeros(0, bool)  # tag id -> in lookup, for the ids seen so far

        def known(tag_ids):
            nonlocal flags
            if len(flags) < len(_TAG_NAMES):  # only tags new to this process are looked up
                new = [name in lookup for name in _TAG_NAMES[len(flags):]]
                flags = np.concatenate([flags, np.array(new, bool)])
            return flags[tag_ids]

        _outputs.clear()
        _outputs[key] = (lookup, names, per_tag, known)
    return _outputs[key][1], _outputs[key][2], _outputs[key][3]


TAG_TABLE_MAX = 1 << 20  # distinct tags a process numbers (~150 MB of Python strings); past it, it starts over
_TAG_IDS: dict[str, int] = {}
_TAG_NAMES: list[str] = []
_generation = [0]  # bumped whenever the numbering starts over: ids from before mean nothing after


def tag_generation() -> int:
    """Which numbering `caption_tags`' tag ids are in; it changes when the table starts over."""
    return _generation[0]


def _bound_tag_table() -> None:
    """Start the process's tag numbering over once it holds TAG_TABLE_MAX tags, and with it every
    cache that holds tag ids: a worker's memory then does not grow with the distinct tags of a
    whole build. Called between units only, never while ids are in use."""
    if len(_TAG_NAMES) < TAG_TABLE_MAX:
        return
    _TAG_IDS.clear()
    _TAG_NAMES.clear()
    _chunk_table().clear()
    _outputs.clear()
    _generation[0] += 1


def _chunk_tag_ids(chunk: str, *, parse: Callable[[str], tuple[str, ...]] = chunk_tags) -> list[int]:
    """`chunk_tags` as ids into this process's table of every tag seen. Not cached itself: the chunk
    table (`_ChunkTable`) keeps each chunk's ids, and only its rare fallback comes here twice."""
    out = []
    for t in parse(chunk):
        i = _TAG_IDS.get(t)
        if i is None:
            i = _TAG_IDS[t] = len(_TAG_NAMES)
            _TAG_NAMES.append(t)
        out.append(i)
    return out


def unique_grouped(keys):
    """The distinct values of keys that come grouped by caption (row-major): a stable sort of such
    runs is nearly linear (timsort), several times faster than numpy's hash-based unique."""
    import numpy as np

    if not len(keys):
        return keys
    k = np.sort(keys, kind="stable")
    return k[np.concatenate([[True], k[1:] != k[:-1]])]


def _expand_ids(rows, codes, ragged: list[list[int]]):
    """For occurrence i of item codes[i] in row rows[i], one (row, id) pair per id in ragged[codes[i]]."""
    import numpy as np

    lens = np.fromiter(map(len, ragged), np.int64, len(ragged))
    flat = np.fromiter(itertools.chain.from_iterable(ragged), np.int64, int(lens.sum()))  # C-level flatten
    return expand_csr(rows, codes, np.cumsum(lens) - lens, lens, flat)


def expand_csr(rows, codes, starts, lens, flat):
    """`_expand_ids` over a table already in arrays: item c's ids are flat[starts[c]:starts[c] + lens[c]]."""
    import numpy as np

    per = lens[codes]
    end = np.cumsum(per)
    total = int(end[-1]) if len(end) else 0
    gather = np.repeat(starts[codes] - (end - per), per) + np.arange(total)
    return np.repeat(rows, per), flat[gather]


def _per_chunk(fn: Callable[[str], Sequence[str]], tags_of: Mapping[str, list[str]], chunk: str) -> list[str]:
    return [x for tag in tags_of[chunk] for x in fn(tag)]


def flat_map_distinct(lists: pl.Series, fn: Callable[[str], Sequence[str]], *, name: str) -> pl.Series:
    """Row-wise `dict.fromkeys(x for item in row for x in fn(item))`, calling `fn` once per distinct item.

    `lists` is a List[String] Series (null rows count as empty); the result is a List[String] Series
    of the same length. Only the distinct items cross into Python; the per-row expansion and the
    first-occurrence dedupe are index arithmetic on integer ids (numpy), and the strings are gathered
    back in Rust. This is what makes mining 1M captions take well under a second of CPU.
    """
    return flat_map_distinct_many(lists, {name: fn})[name]


def flat_map_distinct_many(lists: pl.Series, fns: Mapping[str, Callable[[str], Sequence[str]]]) -> dict[str, pl.Series]:
    """`flat_map_distinct` for several functions over the same lists, sharing the distinct-item codes."""
    import numpy as np

    n_items = lists.list.len().fill_null(0).to_numpy().astype(np.int64)  # per row
    item_off = np.concatenate([[0], np.cumsum(n_items)])
    items = lists.explode(empty_as_null=False, keep_nulls=False)
    codes, distinct = _distinct_codes(items)  # items[i] == distinct[codes[i]]
    return {name: _expand(codes, distinct, item_off, fn, name=name) for name, fn in fns.items()}


def _expand(codes, distinct: list[str], item_off, fn: Callable[[str], Sequence[str]], *, name: str) -> pl.Series:
    import numpy as np
    import polars as pl
    import pyarrow as pa

    vocab: dict[str, int] = {}  # every output string, numbered
    results = [[vocab.setdefault(x, len(vocab)) for x in fn(d)] for d in distinct]
    res_len = np.fromiter(map(len, results), np.int64, len(results))
    res_ids = np.fromiter((i for r in results for i in r), np.int64, int(res_len.sum()))
    res_start = np.cumsum(res_len) - res_len

    # Expand each item occurrence into its outputs: item i contributes res_ids[res_start[c]:+res_len[c]].
    per_item = res_len[codes]
    end = np.cumsum(per_item)
    total = int(end[-1]) if len(end) else 0
    gather = np.repeat(res_start[codes] - (end - per_item), per_item) + np.arange(total)
    out = res_ids[gather]
    row_off = np.concatenate([[0], end])[item_off]

    if total:  # drop repeats within a row, keeping the first occurrence (order is preserved)
        rows = np.repeat(np.arange(len(item_off) - 1), np.diff(row_off))
        first = first_occurrences(rows * max(len(vocab), 1) + out)
        if not first.all():
            out = out[first]
            row_off = np.concatenate([[0], np.cumsum(first)])[row_off]

    strings = pl.Series(list(vocab), dtype=pl.String).gather(pl.Series(out, dtype=pl.UInt64))
    # offsets through a buffer, not pa.array(ndarray): that call imports pandas (~1 s per worker)
    offsets = pa.Array.from_buffers(pa.int64(), len(row_off), [None, pa.py_buffer(row_off.astype(np.int64))])
    arr = pa.LargeListArray.from_arrays(offsets, strings.to_arrow())
    return pl.Series(name, arr, dtype=pl.List(pl.String))


def _distinct_codes(items: pl.Series) -> tuple[np.ndarray, list[str]]:
    """(codes, distinct) with items == distinct[codes]. Hashing to u64 first is ~5x faster than
    hashing strings twice (unique + replace); a 64-bit collision is checked for and falls back."""
    import numpy as np
    import polars as pl

    h = items.hash(seed=0)
    first = h.is_first_distinct()
    distinct = items.filter(first)
    ids = pl.int_range(len(distinct), eager=True, dtype=pl.UInt32)
    codes = h.replace_strict(h.filter(first), ids, return_dtype=pl.UInt32)
    if len(items) and not (distinct.gather(codes) == items).all():
        distinct = items.unique(maintain_order=True)
        ids = pl.int_range(len(distinct), eager=True, dtype=pl.UInt32)
        codes = items.replace_strict(distinct, ids, return_dtype=pl.UInt32)
    return codes.to_numpy().astype(np.int64), distinct.to_list()


def extract_hashtags_batch(texts: pl.Series | list[str | None]) -> list[list[str]]:
    """Same result as `[extract_hashtags(t) for t in texts]`, computed by `extract_hashtags_series`."""
    return extract_hashtags_series(texts).to_list()
