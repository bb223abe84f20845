"""Hashtag mining + WordNet mapping throughput (captions/s), ours against a plain-Python baseline.

The real TweetEval tweets (45,000 lines with hashtags, mentions, emoji and URLs) are replicated to
--lines captions. WordNet is loaded and the mapper's indexes are built before any clock starts
("once WordNet is loaded"). Then, in one run:

* baseline: per caption `re.findall(r"#(\\w+)")` + lower(), and per tag `wn.synsets(tag, "n")[0]`
  with no cache (lemma + morphy only, i.e. less work than ours), timed on the first
  --baseline-lines captions (its rate is per caption, so a subset is a fair sample; 1M would take
  minutes);
* ours, cold: `HashtagMapper.mine` (Rust regex over the column, hashtag rules once per distinct
  chunk, every distinct tag resolved once through all rules incl. wordsegment, numpy regrouping
  per caption) on a fresh mapper: the cost a first build pays;
* ours, warm: the same pipeline again with the mapper's cache filled (and the chunk cache, which
  is per process): the steady-state cost once the distinct tags have been seen (best of --repeat).

Both sides produce, per caption, the list of wnids of its hashtags. Printed: captions/s of each and
the ratios. Replication makes every distinct tag recur 22x, so the cold number is optimistic for
real 1M-caption corpora (more distinct tags) and the warm one is the pure per-caption cost.

    NLTK_DATA=../shared/data/nltk_data uv run python tools/bench/mining.py
    NLTK_DATA=../shared/data/nltk_data uv run python tools/bench/mining.py --lines 200000 --repeat 1
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TWEETS = ROOT.parent / "shared" / "data" / "text" / "tweets_emoji_train_text.txt"


def baseline(lines: list[str], wn) -> list[list[str]]:
    """What one writes first: regex per caption, WordNet per tag occurrence, no cache."""
    tag_re = re.compile(r"#(\w+)")
    out = []
    for line in lines:
        wnids = []
        for tag in tag_re.findall(line):
            synsets = wn.synsets(tag.lower(), pos="n")
            if synsets:
                wnids.append(f"n{synsets[0].offset():08d}")
        out.append(wnids)
    return out


def ours(texts: pl.Series, mapper) -> pl.DataFrame:
    """Rust regex over the column, Python rules once per distinct chunk / tag, numpy regrouping."""
    return mapper.mine(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tweets", type=Path, default=DEFAULT_TWEETS, help="one caption per line")
    ap.add_argument("--lines", type=int, default=1_000_000, help="replicate the tweets to this many captions")
    ap.add_argument("--baseline-lines", type=int, default=50_000, help="captions the baseline is timed on")
    ap.add_argument("--repeat", type=int, default=3, help="warm runs; the best is reported")
    args = ap.parse_args()
    if not args.tweets.exists():
        raise SystemExit(f"tweets file not found: {args.tweets} (expected ../shared/data/text/)")

    from maws_data.hashtags import chunk_tags
    from maws_data.wordnet import HashtagMapper, load_wordnet

    t0 = time.perf_counter()
    wn = load_wordnet()
    HashtagMapper()  # builds the per-process lemma/concat indexes, outside every timed region
    print(f"WordNet loaded + indexes built in {time.perf_counter() - t0:.1f} s (not timed below)")

    source = [line for line in args.tweets.read_text(encoding="utf-8").split("\n") if line]
    lines = (source * (args.lines // len(source) + 1))[: args.lines]
    texts = pl.Series("caption", lines, dtype=pl.String)
    n_base = min(args.baseline_lines, len(lines))
    print(f"{len(lines):,} captions ({len(source):,} distinct tweets replicated), baseline on the first {n_base:,}")

    t = time.perf_counter()
    base = baseline(lines[:n_base], wn)
    base_rate = n_base / (time.perf_counter() - t)
    print(f"baseline  (re.findall + wn.synsets per tag): {base_rate:>12,.0f} captions/s")

    chunk_tags.cache_clear()
    mapper = HashtagMapper()
    t = time.perf_counter()
    result = ours(texts, mapper)["wnids"]
    cold = time.perf_counter() - t
    cold_rate = len(lines) / cold
    distinct = len(mapper)
    print(f"ours cold (fresh cache, {distinct:,} distinct tags): {cold_rate:>12,.0f} captions/s  ({cold:.2f} s)")

    warm, warm_cpu = min(_timed(lambda: ours(texts, mapper)) for _ in range(args.repeat))
    warm_rate = len(lines) / warm
    print(f"ours warm (cache filled):                    {warm_rate:>12,.0f} captions/s  ({warm:.2f} s)")
    # On a shared box wall time depends on the neighbours; CPU seconds (all threads) do not.
    print(
        f"  warm run used {warm_cpu:.2f} CPU s = {len(lines) / warm_cpu:,.0f} captions per CPU-second "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    print(f"ratio cold/baseline: {cold_rate / base_rate:.1f}x   warm/baseline: {warm_rate / base_rate:.1f}x")
    print(
        f"target >= 1,000,000 captions/s: cold {'met' if cold_rate >= 1e6 else 'NOT met'}, "
        f"warm {'met' if warm_rate >= 1e6 else 'NOT met'}"
    )

    labeled = int((result.list.len() > 0).sum())
    base_labeled = sum(1 for w in base if w)
    print(f"captions with >= 1 synset: ours {labeled / len(lines):.1%}, baseline {base_labeled / n_base:.1%}")


def _timed(fn) -> tuple[float, float]:
    """(wall s, CPU s of this process) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


if __name__ == "__main__":
    main()
