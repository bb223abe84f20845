"""Mapping coverage on real Instagram hashtags: how many tags reach a WordNet noun synset, and how.

Reads HARRISON's `harrison_tags.txt` (57,383 posts, one per line, space-separated tags without '#'),
maps every distinct tag once with the default `MappingConfig`, and prints:

* the share of distinct tags and of tag occurrences that map to at least one synset;
* the same split by rule (lemma, morphy, split, concat, segment, stopword, unmapped);
* --examples random mapped tags (seeded) with the synset name and gloss, for a person to check;
* the most frequent unmapped tags, to grow the rules or the stop list from.

    NLTK_DATA=../shared/data/nltk_data uv run python tools/bench/coverage.py
    NLTK_DATA=../shared/data/nltk_data uv run python tools/bench/coverage.py --seed 1 --examples 50
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TAGS = ROOT.parent / "shared" / "data" / "text" / "harrison_tags.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", type=Path, default=DEFAULT_TAGS, help="one post per line, space-separated tags")
    ap.add_argument("--examples", type=int, default=30, help="random mapped tags to print")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unmapped", type=int, default=20, help="most frequent unmapped tags to print")
    args = ap.parse_args()
    if not args.tags.exists():
        raise SystemExit(f"tag file not found: {args.tags} (expected ../shared/data/text/harrison_tags.txt)")

    from maws_data.hashtags import normalise_tag
    from maws_data.wordnet import HashtagMapper, synset_of

    counts: Counter[str] = Counter()
    for line in args.tags.read_text(encoding="utf-8").splitlines():
        # the same normalisation as mined hashtags; a post lists each tag once
        counts.update({t for t in map(normalise_tag, line.split()) if t})

    mapper = HashtagMapper()
    t = time.perf_counter()
    explained = {tag: mapper.explain(tag) for tag in counts}
    elapsed = time.perf_counter() - t

    total = sum(counts.values())
    mapped = [tag for tag, (wnids, _) in explained.items() if wnids]
    mapped_occ = sum(counts[tag] for tag in mapped)
    print(
        f"{args.tags.name}: {len(counts):,} distinct tags, {total:,} occurrences "
        f"(mapped in {elapsed:.1f} s, {elapsed / len(counts) * 1e3:.2f} ms/tag)"
    )
    print(f"mapped: {len(mapped) / len(counts):.1%} of distinct tags, {mapped_occ / total:.1%} of occurrences")

    print(f"\n{'rule':10s} {'distinct':>9s} {'share':>7s} {'occurrences':>12s} {'share':>7s}")
    by_rule: Counter[str] = Counter(rule for _, rule in explained.values())
    occ_rule: Counter[str] = Counter()
    for tag, (_, rule) in explained.items():
        occ_rule[rule] += counts[tag]
    for rule, n in by_rule.most_common():
        print(f"{rule:10s} {n:>9,} {n / len(counts):>7.1%} {occ_rule[rule]:>12,} {occ_rule[rule] / total:>7.1%}")

    print(f"\n{args.examples} random mapped tags (seed {args.seed}): tag -> synset (rule): gloss")
    rng = random.Random(args.seed)
    for tag in rng.sample(sorted(mapped), min(args.examples, len(mapped))):
        wnids, rule = explained[tag]
        s = synset_of(wnids[0])
        print(f"  {tag:22s} -> {wnids[0]} {s.name():28s} ({rule}): {s.definition()[:60]}")

    print(f"\n{args.unmapped} most frequent unmapped tags:")
    unmapped = sorted((t for t, (_, r) in explained.items() if r == "unmapped"), key=lambda t: -counts[t])
    print("  " + ", ".join(f"{t} ({counts[t]})" for t in unmapped[: args.unmapped]))


if __name__ == "__main__":
    main()
