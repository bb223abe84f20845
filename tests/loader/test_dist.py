"""2 gloo processes over the tiny build's unequal shards (16/16/16/12): 3 epochs, stopped mid-epoch and
resumed from the saved loader states; the same batches as an uninterrupted run, equal batch counts (every
step all-reduced), no sample twice in an epoch and none on both ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("dist_epochs.py")


def torchrun(run, build: Path, out: Path, *extra: str) -> None:
    """The script on 2 gloo processes (one thread each), killed with its workers after 300 s."""
    out.mkdir(parents=True, exist_ok=True)
    run([str(SCRIPT), str(build), str(out), *extra], 300)


@pytest.mark.dist
def test_two_ranks_three_epochs_with_a_resume_in_the_middle(tiny_build, tmp_path, two_gloo_ranks):
    torchrun(two_gloo_ranks, tiny_build, tmp_path / "whole")
    torchrun(two_gloo_ranks, tiny_build, tmp_path / "cut", "--stop", "1", "4")
    state = json.loads((tmp_path / "cut" / "state-0.json").read_text())
    assert (state["epoch"], state["batches"]) == (1, 4)  # a few integers locate the position
    torchrun(two_gloo_ranks, tiny_build, tmp_path / "cut", "--resume")
    whole = [json.loads((tmp_path / "whole" / f"keys-{r}.json").read_text()) for r in range(2)]
    cut = [json.loads((tmp_path / "cut" / f"keys-{r}.json").read_text()) for r in range(2)]
    assert cut == whole
    assert len(whole[0]) == len(whole[1]) == 3 * 7  # 60 samples // (2 x 4) = 7 batches per rank and epoch
    for epoch in range(3):
        keys = [k for r in range(2) for e, _, batch in whole[r] if e == epoch for k in batch]
        assert len(keys) == len(set(keys)) == 56
    epochs = [[k for e, _, b in whole[0] if e == epoch for k in b] for epoch in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
