"""maws_data.wordnet: exact wnids for known hashtags, each rule, stop lists, ambiguity, missing WordNet."""

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
NLTK_DATA = SHARED / "nltk_data"
WORDNET = NLTK_DATA / "corpora" / "wordnet"


@pytest.fixture(scope="module")
def wn_env():
    """Point nltk at the shared WordNet unless the caller already did (CI sets NLTK_DATA)."""
    if not os.environ.get("NLTK_DATA"):
        if not WORDNET.exists():
            pytest.skip(f"WordNet not found at {WORDNET} and NLTK_DATA unset")
        os.environ["NLTK_DATA"] = str(NLTK_DATA)
        import nltk

        if str(NLTK_DATA) not in nltk.data.path:
            nltk.data.path.insert(0, str(NLTK_DATA))


@pytest.fixture(scope="module")
def mapper(wn_env):
    from maws_data.wordnet import HashtagMapper

    return HashtagMapper()  # loads WordNet once for the module (~10 s on 2 cores)


@pytest.mark.parametrize(
    ("tag", "wnids", "rule"),
    [
        ("dog", ["n02084071"], "lemma"),
        ("dogs", ["n02084071"], "morphy"),
        ("women", ["n10787470"], "morphy"),  # woman.n.01, irregular plural from noun.exc
        ("golden_retriever", ["n02099601"], "lemma"),
        ("goldenretriever", ["n02099601"], "concat"),
        ("goldenretrievers", ["n02099601"], "concat"),
        ("brownbear", ["n02132136"], "concat"),
        ("ursusarctos", ["n02132136"], "concat"),  # synonym lands on the same synset
        ("sunset2019", ["n15169248"], "split"),  # sunset.n.01
        ("sunset_beach", ["n09217230"], "split"),  # head noun: beach.n.01
        ("GoldenRetriever", ["n02099601"], "split"),  # CamelCase, when given un-casefolded
        ("sunsetbeach", ["n09217230"], "segment"),
        ("dogsofinstagram", ["n02084071"], "suffix"),  # -instagram off, then "dogs|of" -> "X of Y" -> X
        ("catsofnewyork", ["n02121620"], "segment"),  # "X of Y" -> X
        ("petstagram", ["n01318894"], "suffix"),  # pet.n.01 (segmentation alone read pets|tag|ram -> RAM)
        ("catsagram", ["n02121620"], "suffix"),  # cat.n.01 (segmentation alone: cats|a|gram -> the unit)
        ("diagram", ["n03186399"], "lemma"),  # a real word ending in -gram is a lemma first
        ("foodporn", ["n00021265"], "segment"),  # trailing filler dropped -> food.n.01
        ("café", ["n02935658"], "lemma"),  # accents folded: cafe.n.01
        ("instagood", [], "stopword"),
        ("photooftheday", [], "stopword"),
        ("loves", [], "stopword"),  # its lemma "love" is a stop word
        ("日本", [], "unmapped"),
        ("la", [], "unmapped"),  # shorter than min_length
        ("xqzvwk", [], "unmapped"),
    ],
)
def test_known_tags(mapper, tag, wnids, rule):
    assert mapper.explain(tag) == (wnids, rule)
    assert mapper.map(tag) == wnids


def test_names_and_ids(mapper):
    from maws_data.wordnet import synset_name, synset_of, wnid_of

    assert synset_name("n02099601") == "golden_retriever.n.01"
    assert synset_name("n02132136") == "brown_bear.n.01"
    assert wnid_of(synset_of("n01440764")) == "n01440764"  # tench, an Imagenette class
    with pytest.raises(ValueError, match="n02099601"):
        synset_of("02099601")


def test_map_many_and_series(mapper):
    assert mapper.map_many(["dogs", "dog", "instagood", "dogs"]) == {
        "dogs": ["n02084071"],
        "dog": ["n02084071"],
        "instagood": [],
    }
    tags = pl.Series([["dogs", "dog", "brownbear"], [], None, ["instagood", "ursusarctos"]], dtype=pl.List(pl.String))
    assert mapper.map_series(tags).to_list() == [["n02084071", "n02132136"], [], [], ["n02132136"]]


def test_stoplist_file_replaces_and_extra_extends(wn_env, tmp_path):
    from maws_data.wordnet import HashtagMapper, MappingConfig

    stop = tmp_path / "stop.txt"
    stop.write_text("# my stop list\n#Dog\nsunset  # trailing comment\nn02132136\n", encoding="utf-8")
    m = HashtagMapper(MappingConfig(stoplist_path=str(stop), extra_stopwords=("Beach",)))
    assert m.explain("dogs") == ([], "stopword")  # stop word "dog" reached through morphy
    assert m.explain("sunset") == ([], "stopword")
    assert m.explain("brownbear") == ([], "stopword")  # a wnid entry stops the synset
    assert m.explain("beach") == ([], "stopword")
    # the file replaced the default list: instagood is no longer a stop word (it segments to good.n.01)
    assert m.explain("instagood")[1] != "stopword"
    assert m.explain("goldenretriever") == (["n02099601"], "concat")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        HashtagMapper(MappingConfig(stoplist_path=str(tmp_path / "nope.txt")))


def test_ambiguity_policies(wn_env):
    from maws_data.wordnet import HashtagMapper, MappingConfig

    every = HashtagMapper(MappingConfig(ambiguity="all")).map("dog")
    assert every[0] == "n02084071" and len(every) == 7  # dog has 7 noun senses in WordNet 3.0
    skip = HashtagMapper(MappingConfig(ambiguity="skip"))
    assert skip.explain("dog") == ([], "ambiguous")
    assert skip.explain("goldenretriever") == (["n02099601"], "concat")  # one sense: kept
    no_seg = HashtagMapper(MappingConfig(use_segmentation=False))
    assert no_seg.explain("sunsetbeach") == ([], "unmapped")
    with pytest.raises(ValueError, match="ambiguity"):
        MappingConfig(ambiguity="first")  # type: ignore[arg-type]


_PROBE = """
import sys
from maws_data.wordnet import HashtagMapper, WordNetMissingError
try:
    HashtagMapper()
except WordNetMissingError as e:
    print(e)
    sys.exit(3)
print("loaded")
"""


def _run_probe(nltk_data: Path, home: Path) -> subprocess.CompletedProcess:
    # A fresh interpreter: nltk caches the loaded corpus per process, so this is the only way to
    # test a missing corpus without breaking the one this test session already loaded.
    env = {**os.environ, "NLTK_DATA": str(nltk_data), "HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-c", _PROBE], check=False, env=env, capture_output=True, text=True, timeout=120
    )


def test_missing_wordnet_gives_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run_probe(empty, tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "nltk.download('wordnet')" in proc.stdout
    assert "NLTK_DATA" in proc.stdout


def test_debian_wordnet_without_lexnames_gives_clear_error(tmp_path):
    if not WORDNET.exists():
        pytest.skip(f"WordNet not found at {WORDNET}")
    partial = tmp_path / "nltk_data" / "corpora" / "wordnet"
    partial.mkdir(parents=True)
    for f in WORDNET.iterdir():
        if f.name != "lexnames":
            (partial / f.name).symlink_to(f)
    proc = _run_probe(tmp_path / "nltk_data", tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "lexnames" in proc.stdout


def test_mine_equals_extract_then_map_on_real_tweets(mapper):
    from maws_data.hashtags import extract_hashtags

    tweets = SHARED / "text" / "tweets_emoji_train_text.txt"
    if not tweets.exists():
        pytest.skip(f"real tweets not found at {tweets}")
    sample = tweets.read_text(encoding="utf-8").split("\n")[:2000]
    mined = mapper.mine(sample)
    assert mined.columns == ["hashtags", "wnids"]
    expected_tags = [extract_hashtags(t) for t in sample]
    expected_wnids = [list(dict.fromkeys(w for t in tags for w in mapper.map(t))) for tags in expected_tags]
    assert mined["hashtags"].to_list() == expected_tags
    assert mined["wnids"].to_list() == expected_wnids
    assert mapper.map_series(mined["hashtags"]).to_list() == expected_wnids
    assert sum(1 for w in expected_wnids if w) > 300  # the sample does map: a real check, not [] == []
