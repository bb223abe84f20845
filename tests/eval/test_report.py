"""The report holds every encoder and protocol it was given, with spread, commands and plots."""

from __future__ import annotations

import json

import pytest
import torch
from maws_eval import fewshot, knn, linear_probe
from maws_eval.config import FewshotConfig, LinearConfig
from maws_eval.protocol import DatasetRef, EncoderRef, FeatureSet, result_record, write_result
from maws_eval.report import write_report

ENCODERS = ["random-init", "MAE", "WSP", "MAE->WSP"]


def _write_results(out):
    g = torch.Generator().manual_seed(0)
    for i, enc in enumerate(ENCODERS):
        # class signal grows with i, so the table has a known ordering
        y = torch.arange(4).repeat_interleave(12)
        centres = torch.randn(4, 16, generator=g) * (0.3 + i)
        feats = FeatureSet(centres[y] + torch.randn(48, 16, generator=g), y,
                           centres[y] + torch.randn(48, 16, generator=g), y, classes=("a", "b", "c", "d"))
        ms = [*linear_probe.run(feats, LinearConfig(l2_grid=(1e-3,), seeds=(0, 1))), *knn.run(feats),
              *fewshot.run(feats, FewshotConfig(shots=(1, 5), seeds=(0, 1, 2)))]
        for m in ms:
            write_result(result_record(m, encoder=EncoderRef(enc, f"/runs/{enc}"), command=f"maws-eval all {enc}",
                                       dataset=DatasetRef("toy", "/data/toy", 48, 48, 4)), out)


def _write_run(d, name, losses):
    run = d / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": v, "lr": 0.1}) + "\n"
                                               for i, v in enumerate(losses)))
    return run


def test_report_has_every_encoder_protocol_and_plot(tmp_path):
    results = tmp_path / "results"
    _write_results(results)
    runs = [_write_run(tmp_path, "mae", [1.0, 0.8, 0.7]), _write_run(tmp_path, "wsp", [2.3, 2.0])]
    out = tmp_path / "report"
    rep = write_report([results], out_dir=out, run_dirs=runs, encoder_order=ENCODERS)
    table = rep["datasets"]["toy"]
    assert table["encoders"] == ENCODERS
    assert table["columns"] == ["linear", "knn", "fewshot-1shot", "fewshot-5shot"]
    for enc in ENCODERS:
        assert set(table["table"][enc]) == set(table["columns"])
        assert table["table"][enc]["linear"]["n"] == 2 and table["table"][enc]["fewshot-5shot"]["n"] == 3
    assert [r["last_loss"] for r in rep["runs"]] == [0.7, 2.0]
    md = (out / "report.md").read_text()
    for enc in ENCODERS:
        assert f"| {enc} |" in md and f"maws-eval all {enc}" in md
    assert "| linear | knn | fewshot-1shot | fewshot-5shot |" in md and " ± " in md
    for png in ("bars-toy.png", "fewshot-toy.png", "losses.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in rep["plots"]
    assert json.loads((out / "report.json").read_text()) == rep


def test_report_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no result files"):
        write_report([tmp_path], out_dir=tmp_path / "r")
    (tmp_path / "bad.json").write_text('{"x": 1}')
    with pytest.raises(ValueError, match="bad.json: not a maws-eval result"):
        write_report([tmp_path], out_dir=tmp_path / "r")
    (tmp_path / "bad.json").unlink()
    _write_results(tmp_path / "results")
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        write_report([tmp_path / "results"], out_dir=tmp_path / "r", run_dirs=[tmp_path])


def test_across_runs_gives_mean_and_std_over_training_runs(tmp_path):
    """Three result folders (the pipeline at --seed 0, 1, 2) with known kNN numbers for MAE: 50, 60, 70 %."""
    import shutil

    first = tmp_path / "seed0"
    _write_results(first)
    folders = [first, tmp_path / "seed1", tmp_path / "seed2"]
    for i, folder in enumerate(folders):
        if i:
            shutil.copytree(first, folder)
        path = next(folder.glob("MAE.toy.knn.json"))
        rec = json.loads(path.read_text())
        rec.update(value=0.5 + 0.1 * i, values=[0.5 + 0.1 * i], command=f"maws-eval all MAE --run {i}")
        path.write_text(json.dumps(rec))
    combined = write_report(folders, out_dir=tmp_path / "combined", across_runs=True)["datasets"]["toy"]["table"]
    knn_cell = combined["MAE"]["knn"]
    assert knn_cell["value"] == pytest.approx(0.6) and knn_cell["std"] == pytest.approx(0.1) and knn_cell["n"] == 3
    assert combined["WSP"]["knn"]["std"] == 0.0  # identical copies: no spread
    md = (tmp_path / "combined" / "report.md").read_text()
    assert "over training runs" in md and all(f"maws-eval all MAE --run {i}" in md for i in range(3))
    last_wins = write_report(folders, out_dir=tmp_path / "plain")["datasets"]["toy"]["table"]
    assert last_wins["MAE"]["knn"]["value"] == pytest.approx(0.7) and last_wins["MAE"]["knn"]["n"] == 1
