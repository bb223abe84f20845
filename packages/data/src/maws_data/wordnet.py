"""WordNet mapping: normalised hashtag -> WordNet 3.0 noun synsets (step 2 of `maws-data build`).

Each distinct hashtag is mapped once (cached) by the first rule that gives a noun synset:

1. `stopword`  the tag (or the lemma a later rule lands on) is in the stop list -> no synset.
2. `lemma`     the tag is a WordNet noun lemma: `dog`, `sunset`.
3. `morphy`    its morphological base is: `dogs` -> `dog`, `women` -> `woman` (nltk `morphy`, nouns only).
4. `split`     underscores and digits (and CamelCase, when the caller passes an un-casefolded tag)
               split it: `golden_retriever` -> golden_retriever.n.01, `sunset2019` -> sunset.n.01.
5. `concat`    it is a multi-word lemma written without separators: `goldenretriever` ->
               golden_retriever.n.01, `ursusarctos` -> brown_bear.n.01 (index built once).
6. `suffix`    an Instagram suffix (`-instagram`, `-stagram`, `-sagram`, `-gram`) comes off and the rest
               maps by rules 2-7: `petstagram` -> pet.n.01, `catsagram` -> cat.n.01 (word segmentation
               would read `pets|tag|ram` -> RAM, `cats|a|gram` -> the unit of mass).
7. `segment`   `wordsegment` splits it into words as a last resort: `sunsetbeach` -> beach.n.01.
8. `unmapped`  none of the above (`ambiguous` under the "skip" policy).

For rules 4 and 7 the words are reduced to their head noun phrase: words from the first preposition
on are dropped (`dogs|of|insta|gram` -> `dogs`: an "X of Y" compound is about X), then the longest
run of trailing words that is a noun lemma wins (`my|golden|retriever` -> golden_retriever, else
`sunset|beach` -> beach): English compounds are head-final.

Ambiguity (a lemma with several noun senses) follows `MappingConfig.ambiguity`: "most_frequent"
(default; WordNet lists a lemma's senses by tagged-corpus frequency, so sense 1 is `dog.n.01`, not
`frump.n.01`), "all" (every noun sense), or "skip" (map only lemmas with one noun sense).

Label ids are ImageNet-style wnids: "n" + the 8-digit synset offset, e.g. n02099601.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import polars as pl

Rule = Literal["lemma", "morphy", "split", "concat", "suffix", "segment", "stopword", "ambiguous", "unmapped"]

# Suffixes Instagram users glue onto a subject (longest first): #petstagram, #catsagram, #kittygram.
# Only tags that are not WordNet lemmas themselves reach this rule, so diagram, telegram, kilogram stay.
INSTAGRAM_SUFFIXES = ("instagram", "stagram", "sagram", "gram")

# Instagram/Twitter filler: engagement bait, app and filter names, dates, moods and generic praise
# that say nothing about what is in the picture. The most frequent ones in harrison_tags.txt and the
# TweetEval tweets were read by hand. Entries that look like wnids ("n07543288") stop a synset
# whatever tag leads to it.
_DEFAULT_STOPWORDS_TEXT = """
# engagement bait
instagood photooftheday picoftheday bestoftheday photoftheday potd tbt
like likes like4like likeforlike l4l lfl likeforfollow likeback
follow followme follow4follow followforfollow f4f followback fff
tagsforlikes tagforlikes tflers shoutout s4s spam4spam comment c4c
commentforcomment repost regram hashtag tags tag
# app and platform names
instagram insta ig igers iger igdaily instadaily instalike instamood
instapic instacool instafollow instalove instahub instaphoto instasize
instalife instafashion webstagram statigram snapchat vsco vscocam
vscogood nofilter iphoneonly iphonesia picstitch photo photos pic
pics picture pictures photography photographer photograph
# time words
throwback throwbackthursday flashback fbf today now daily day time
monday tuesday wednesday thursday friday saturday sunday weekend
january february march april may june july august september
october november december
# moods, praise and abstractions
love loveit loveyou iloveyou lovely happy happiness fun funny cute
beautiful beauty amazing awesome cool nice good best new old
lol omg swag yolo me life lifestyle goodtimes goodmorning
goodnight goodvibes vibes mood blessed motivation inspiration quote
quotes truth bored tired sexy hot pretty sweet yum yummy memory
memories moment moments art
# photo-style suffixes: foodporn, earthporn are pictures OF food, earth (dropped as a trailing
# word by rules 4 and 7); black-and-white is a photo style (WordNet sense 1 is "in writing")
porn blackandwhite bnw bw
"""
DEFAULT_STOPWORDS: tuple[str, ...] = tuple(
    w for line in _DEFAULT_STOPWORDS_TEXT.splitlines() if not line.startswith("# ") for w in line.split()
)

_WNID_RE = re.compile(r"^n\d{8}$")
# "X of Y" hashtags (dogsofinstagram, lifeonthebeach): the head noun comes before the preposition.
_PREPOSITIONS = frozenset({"of", "on", "in", "at", "for", "with", "from", "by", "to", "and"})
# Plural endings for the concatenation index, which morphy cannot reduce (morphy only knows lemmas
# that exist with separators). Same suffix rules as WordNet's morphy for nouns.
_NOUN_SUFFIXES = (
    ("ses", "s"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
    ("s", ""),
)

NLTK_HELP = (
    "Run `uv run python -c \"import nltk; nltk.download('wordnet')\"` on a machine with internet, "
    "or set NLTK_DATA to a folder holding corpora/wordnet/ (e.g. NLTK_DATA=../shared/data/nltk_data). "
    "Debian's wordnet-base package alone is not enough: nltk also needs lexnames and index.sense."
)


class WordNetMissingError(LookupError):
    """nltk cannot find (or fully read) WordNet 3.0."""


@dataclass(frozen=True)
class MappingConfig:
    """How hashtags map to synsets. Defaults are the documented behaviour (docs/hashtags.md).

    stoplist_path: a UTF-8 file with one stop word per line, '#' optional ("# " starts a comment); it REPLACES the
        built-in DEFAULT_STOPWORDS. Entries may be hashtags or wnids.
    extra_stopwords: added to the stop list (the built-in one or the file's).
    ambiguity: "most_frequent" (sense 1), "all" (every noun sense), "skip" (only unambiguous lemmas).
    use_segmentation: run wordsegment as the last rule (about 1 ms per unmapped distinct tag).
    min_length: shorter tags are left unmapped (two-letter tags are mostly abbreviations WordNet
        reads otherwise: "la" -> Louisiana, "tb" -> tuberculosis); also the shortest head word
        that rules 4 and 7 accept.
    max_segments: segmentations into more words are rejected as noise.
    """

    stoplist_path: str | None = None
    extra_stopwords: tuple[str, ...] = ()
    ambiguity: Literal["most_frequent", "all", "skip"] = "most_frequent"
    use_segmentation: bool = True
    min_length: int = 3
    max_segments: int = 4

    def __post_init__(self) -> None:
        if self.ambiguity not in ("most_frequent", "all", "skip"):
            raise ValueError(f"ambiguity must be most_frequent|all|skip, got {self.ambiguity!r}")

    def stopwords(self) -> frozenset[str]:
        if self.stoplist_path is None:
            words: Iterable[str] = DEFAULT_STOPWORDS
        else:
            path = Path(self.stoplist_path)
            if not path.is_file():
                raise FileNotFoundError(f"stop list {path} not found (expected one word per line)")
            lines = path.read_text(encoding="utf-8").splitlines()
            # "# text" (hash + space) is a comment, whole-line or trailing; "#dog" is a word.
            words = (re.sub(r"(^|\s)#(\s.*)?$", "", line).strip() for line in lines)
        return frozenset(_fold(w.lstrip("#＃")) for w in (*words, *self.extra_stopwords) if w.strip())


def _fold(word: str) -> str:
    # The same normalisation as maws_data.hashtags, so stop words match extracted tags.
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", word.strip()).casefold())


def load_wordnet():
    """The nltk WordNet reader, loaded (once per process; nltk caches it), or a clear error."""
    from nltk.corpus import wordnet as wn

    try:
        wn.ensure_loaded()
        version = wn.get_version()
    except (LookupError, OSError) as e:
        raise WordNetMissingError(
            f"nltk could not load WordNet 3.0 (NLTK_DATA={os.environ.get('NLTK_DATA')!r}): {e}\n{NLTK_HELP}"
        ) from e
    if version != "3.0":
        raise WordNetMissingError(f"WordNet {version} found, but labels are WordNet 3.0 offsets.\n{NLTK_HELP}")
    return wn


@dataclass(frozen=True)
class _Index:
    senses: dict[str, tuple[str, ...]]  # noun lemma (lower case, '_' for spaces) -> wnids, sense order
    concat: dict[str, tuple[str, ...]]  # lemma with separators removed -> lemmas (multi-word only)


@cache
def _index() -> _Index:
    """Noun lemma -> wnids, straight from WordNet's index.noun (built once per process, ~0.3 s)."""
    wn = load_wordnet()
    # index.noun lists each lemma's synset offsets in sense order; nltk keeps it as
    # _lemma_pos_offset_map. wn.synsets(lemma) would also add the senses of morphy's base forms
    # ("glasses" -> glass.n.01), which is rule 3's job, and is 100x slower over 117k lemmas.
    offsets = getattr(wn, "_lemma_pos_offset_map", None)
    senses: dict[str, tuple[str, ...]] = {}
    for name in wn.all_lemma_names(pos="n"):
        if offsets is not None:
            senses[name] = tuple(f"n{o:08d}" for o in offsets[name]["n"])
        else:  # public (slow) path, should a future nltk rename the private map
            senses[name] = tuple(wnid_of(lm.synset()) for lm in wn.lemmas(name, pos="n"))
    concat: dict[str, list[str]] = {}
    for name in sorted(senses):
        key = "".join(ch for ch in name if ch.isalnum())
        if key != name and key:
            concat.setdefault(key, []).append(name)
    return _Index(senses, {k: tuple(v) for k, v in concat.items()})


def wnid_of(synset) -> str:
    """ImageNet-style id of an nltk synset: 'n02099601' for golden_retriever.n.01."""
    return f"{synset.pos()}{synset.offset():08d}"


def synset_of(wnid: str):
    """The nltk synset of a wnid ('n02099601' -> Synset('golden_retriever.n.01'))."""
    if not _WNID_RE.match(wnid):
        raise ValueError(f"not a noun wnid: {wnid!r} (expected 'n' + 8 digits, e.g. n02099601)")
    return load_wordnet().synset_from_pos_and_offset("n", int(wnid[1:]))


def synset_name(wnid: str) -> str:
    """'n02099601' -> 'golden_retriever.n.01'."""
    return synset_of(wnid).name()


class HashtagMapper:
    """Maps normalised hashtags to WordNet noun wnids; every distinct tag is resolved once."""

    def __init__(self, cfg: MappingConfig = MappingConfig()) -> None:
        self.cfg = cfg
        self._wn = load_wordnet()
        self._index = _index()
        stop = cfg.stopwords()
        self._stop_wnids = frozenset(w for w in stop if _WNID_RE.match(w))
        self._stop = stop - self._stop_wnids
        self._cache: dict[str, tuple[tuple[str, ...], Rule]] = {}
        self._segment = None  # wordsegment.segment, loaded on first use (~1 s)

    def __len__(self) -> int:
        """Number of distinct tags resolved so far (the cache size)."""
        return len(self._cache)

    def forget(self) -> None:
        """Drop the tags resolved so far: a long-lived worker's mapper then holds one task's tags."""
        self._cache.clear()

    def map(self, tag: str) -> list[str]:
        """wnids of one hashtag ([] when excluded or unmapped)."""
        return list(self.explain(tag)[0])

    def explain(self, tag: str) -> tuple[list[str], Rule]:
        """(wnids, rule that decided it); rule is one of the `Rule` names in the module docstring."""
        hit = self._cache.get(tag)
        if hit is None:
            hit = self._cache[tag] = self._resolve(tag)
        return list(hit[0]), hit[1]

    def map_many(self, tags: Iterable[str]) -> dict[str, list[str]]:
        """{tag: wnids} for the distinct tags given."""
        return {t: self.map(t) for t in dict.fromkeys(tags)}

    def map_series(self, tag_lists: pl.Series) -> pl.Series:
        """Vectorised mapping of a List[String] Series of hashtags to a List[String] Series of wnids.

        Each distinct tag is resolved once; per row the wnids keep the tags' order, without
        duplicates. This is the fast path: only the distinct tags touch Python.
        """
        from maws_data.hashtags import flat_map_distinct

        return flat_map_distinct(tag_lists, self._wnids_of, name="wnids")

    def mine(self, texts: pl.Series | list[str | None]) -> pl.DataFrame:
        """Captions -> DataFrame[hashtags: List[String], wnids: List[String]], one row per caption.

        One regex pass and one distinct-chunk table serve both columns (maws_data.hashtags.mine_series);
        this is the end-to-end fast path that tools/bench/mining.py measures.
        """
        from maws_data.hashtags import mine_series

        return mine_series(texts, {"wnids": self._wnids_of})

    def _wnids_of(self, tag: str) -> tuple[str, ...]:
        hit = self._cache.get(tag)
        if hit is None:
            hit = self._cache[tag] = self._resolve(tag)
        return hit[0]

    # -- rules -------------------------------------------------------------------------------

    def _resolve(self, raw: str) -> tuple[tuple[str, ...], Rule]:
        camel = _camel_words(raw)  # only informative before casefolding; extracted tags are folded
        tag = _fold(raw)
        if tag in self._stop:
            return (), "stopword"
        if len(tag) < self.cfg.min_length:
            return (), "unmapped"
        result = self._rules(tag, camel)
        if result is None and not tag.isascii():
            # Accented Latin: WordNet spells "café" as "cafe". Scripts WordNet lacks stay unmapped.
            plain = _strip_accents(tag)
            if plain != tag and plain.isascii():
                if plain in self._stop:
                    return (), "stopword"
                result = self._rules(plain, None)
        if result is None:
            return (), "unmapped"
        lemma, rule = result
        if lemma in self._stop:
            return (), "stopword"
        return self._senses(lemma, rule)

    def _rules(self, tag: str, camel: list[str] | None) -> tuple[str, Rule] | None:
        """(noun lemma, rule) of the first rule that finds one, else None."""
        senses = self._index.senses
        if tag in senses:
            return tag, "lemma"
        base = self._wn.morphy(tag, "n")
        if base is not None and base in senses:
            return base, "morphy"
        words = camel if camel and len(camel) > 1 else [w for w in re.split(r"[_\d]+", tag) if w]
        if len(words) > 1 or (words and words[0] != tag):
            head = self._head(words)
            if head:
                return head, "split"
        if tag.isalpha():
            lemma = self._concat(tag)
            if lemma:
                return lemma, "concat"
            for suffix in INSTAGRAM_SUFFIXES:
                rest = tag.removesuffix(suffix)
                if rest != tag and len(rest) >= self.cfg.min_length and rest not in self._stop:
                    found = self._rules(rest, None)
                    if found:
                        return found[0], "suffix"
            if self.cfg.use_segmentation and tag.isascii():
                words = self._segment_words(tag)
                if 1 < len(words) <= self.cfg.max_segments:
                    head = self._head(words)
                    if head:
                        return head, "segment"
        return None

    def _lemma(self, word: str) -> str | None:
        if word in self._index.senses:
            return word
        base = self._wn.morphy(word, "n")
        return base if base is not None and base in self._index.senses else None

    def _head(self, words: list[str]) -> str | None:
        """Head noun phrase of a word sequence: cut at the first preposition, then the longest
        suffix that is a noun lemma (or a separator-less multi-word lemma)."""
        words = [w.casefold() for w in words]
        for i, w in enumerate(words):
            if i and w in _PREPOSITIONS:
                words = words[:i]
                break
        # Trailing filler is not the head: dog|photo -> dog, insta|love -> nothing.
        while words and words[-1] in self._stop:
            words.pop()
        for k in range(len(words)):
            suffix = words[k:]
            lemma = self._lemma("_".join(suffix))
            if lemma is None and k == len(words) - 1 and len(suffix[0]) >= self.cfg.min_length:
                lemma = self._concat(suffix[0])
            if lemma is not None and len(suffix[-1]) >= self.cfg.min_length:
                return lemma
        return None

    def _concat(self, tag: str) -> str | None:
        for form in (tag, *(tag[: -len(s)] + r for s, r in _NOUN_SUFFIXES if tag.endswith(s))):
            lemmas = self._index.concat.get(form)
            if lemmas:
                # golden_retriever before golden-retriever style duplicates: the most senses wins,
                # ties broken alphabetically ('_' sorts before letters), so the choice is stable.
                return max(lemmas, key=lambda n: (len(self._index.senses[n]), -lemmas.index(n)))
        return None

    def _segment_words(self, tag: str) -> list[str]:
        if self._segment is None:
            import wordsegment

            wordsegment.load()
            self._segment = wordsegment.segment
        return self._segment(tag)

    def _senses(self, lemma: str, rule: Rule) -> tuple[tuple[str, ...], Rule]:
        wnids = tuple(w for w in self._index.senses[lemma] if w not in self._stop_wnids)
        if not wnids:
            return (), "stopword"
        if self.cfg.ambiguity == "most_frequent":
            return wnids[:1], rule
        if self.cfg.ambiguity == "skip" and len(wnids) > 1:
            return (), "ambiguous"
        return wnids, rule


def _camel_words(tag: str) -> list[str] | None:
    """'GoldenRetriever' -> ['Golden', 'Retriever']; None for tags without an inner capital."""
    if tag.islower() or tag.isupper() or not any(ch.isupper() for ch in tag[1:]):
        return None
    return re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+", tag) or None


def _strip_accents(tag: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFKD", tag) if not unicodedata.combining(ch))
