"""The text pass's mapping of new hashtags: in the driver, or as a mapping round on the runner.

`HashtagMapper.explain` costs ~0.5 ms a tag (WordNet lookups, morphology, word segmentation), so a
build that meets 10^7 tags no cache knew would spend ~1.4 h of one core in the driver. Past
`textpass.MAP_MIN_TAGS` new tags, `map_tags` sends them to the runner, `MAP_TASK_TAGS` per task.

This bench takes the distinct hashtags of the real captions `build_scale.py` builds from
(`../shared/data/text`: HARRISON tags and TweetEval tweets), --tags of them, and maps them with the
cache off, alternating --repeat times, each in a fresh process as a build's driver is: in the
driver (WordNet loading included), and on a local runner of --processes workers (their start-up
and WordNet loading included). It prints the wall time of each, the speedup, and checks that both
give the same mapping.

    NLTK_DATA=../shared/data/nltk_data uv run python tools/bench/map_round.py
    NLTK_DATA=../shared/data/nltk_data uv run python tools/bench/map_round.py --tags 10000 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from maws_data.hashtags import distinct_tags
from maws_data.runner import Runner, RunnerConfig
from maws_data.textpass import map_tags
from maws_data.wordnet import MappingConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_scale import captions  # the same real captions as the build benchmark


def map_once(side: str, n_tags: int, processes: int) -> tuple[float, dict]:
    """(seconds, mapping) of one mapping in this (fresh) process: as a build's driver, WordNet
    loading included; on the runner, its workers' start and WordNet loading included."""
    tags = sorted(distinct_tags(captions()))
    tags = tags[:n_tags] if n_tags else tags
    t0 = time.perf_counter()
    if side == "driver":
        mapping, _ = map_tags(tags, MappingConfig(), "")  # "" = no cache: every tag is mapped
    else:
        with Runner(RunnerConfig(kind="local", processes=processes)) as runner:
            mapping, _ = map_tags(tags, MappingConfig(), "", runner=runner)
    return time.perf_counter() - t0, mapping


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", type=int, default=0, help="map this many of the distinct tags (0: all)")
    ap.add_argument("--processes", type=int, default=2, help="workers of the runner")
    ap.add_argument("--repeat", type=int, default=2, help="driver / runner pairs, alternating")
    ap.add_argument("--side", choices=["driver", "runner"], help=argparse.SUPPRESS)  # one timing, in a child
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        seconds, mapping = map_once(args.side, args.tags, args.processes)
        args.out.write_text(json.dumps({"s": seconds, "mapping": mapping.rows()}))  # sorted by hashtag
        return

    times: dict[str, list[float]] = {"driver": [], "runner": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            got = {}
            for side in ("driver", "runner"):  # each in a fresh process, as a build is
                out = Path(tmp) / f"{side}.json"
                subprocess.run([sys.executable, __file__, "--side", side, "--out", str(out), "--tags", str(args.tags),
                                "--processes", str(args.processes)], check=True)
                got[side] = json.loads(out.read_text())
                times[side].append(got[side]["s"])
            assert got["driver"]["mapping"] == got["runner"]["mapping"], "the two mappings differ"
            n = len(got["driver"]["mapping"])
            print(f"  pair {r + 1}: {n:,} tags, driver {times['driver'][-1]:.1f} s, runner {times['runner'][-1]:.1f} s",
                  flush=True)
    driver, runner = statistics.median(times["driver"]), statistics.median(times["runner"])
    print(f"{n:,} distinct real hashtags: in the driver {driver:.1f} s ({1000 * driver / n:.2f} ms a tag); a mapping "
          f"round on {args.processes} processes {runner:.1f} s: {driver / runner:.2f}x faster (medians of "
          f"{args.repeat}; the same mapping; both from a fresh process, WordNet loading included)")
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
