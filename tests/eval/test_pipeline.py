"""tools/pipeline.py, `tiny` preset (the README's main job), end to end on the real Instagram photos
and Imagenette.

Every stage runs its real CLI (maws-data build, maws-train mae/wsp, maws-eval all/report); the report
must hold all four encoders and every protocol, and a re-run must be a no-op. ~2.5 min on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
CAPTIONS = SHARED / "instagram" / "captions.parquet"
IMAGENETTE = SHARED / "imagenette"
NLTK = SHARED / "nltk_data"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CAPTIONS.is_file() and (IMAGENETTE / "train").is_dir() and NLTK.is_dir()),
                       reason=f"real data absent under {SHARED} (instagram, imagenette, nltk_data)"),
]


def _pipeline_module():
    spec = importlib.util.spec_from_file_location("maws_pipeline", ROOT / "tools" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(900)
def test_pipeline_tiny_preset_end_to_end_and_rerun_is_noop(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NLTK_DATA", str(NLTK))
    pipeline = _pipeline_module()
    out = tmp_path / "pipeline"
    args = ["--captions", str(CAPTIONS), "--eval-data", str(IMAGENETTE), "--preset", "tiny", "--out", str(out)]
    report_md = pipeline.main(args)

    assert report_md == out / "report" / "report.md"
    report = json.loads((out / "report" / "report.json").read_text())
    table = report["datasets"]["imagenette"]
    assert table["encoders"] == ["random-init", "MAE", "WSP", "MAE->WSP"]
    assert table["columns"] == ["linear", "knn", "fewshot-1shot", "fewshot-5shot", "fewshot-10shot", "finetune"]
    preset = pipeline.PRESETS["tiny"]
    assert table["num_train"] == 10 * preset.eval_train_per_class and table["num_val"] == 10 * preset.eval_val_per_class
    for enc in table["encoders"]:
        assert set(table["table"][enc]) == set(table["columns"]), enc
        assert table["table"][enc]["fewshot-5shot"]["n"] == 5
    md = report_md.read_text()
    for row in ("| random-init |", "| MAE |", "| WSP |", "| MAE->WSP |"):
        assert row in md
    assert [r["name"] for r in report["runs"]] == ["mae", "wsp", "mae_wsp"]
    assert all(r["steps"] > 0 and r["last_loss"] is not None for r in report["runs"])
    # MAE->WSP really started from the MAE encoder, WSP from scratch did not
    wsp_cfg = json.loads((out / "runs" / "mae_wsp" / "config.json").read_text())
    scratch_cfg = json.loads((out / "runs" / "wsp" / "config.json").read_text())
    assert wsp_cfg["init"] == str(out / "runs" / "mae") and scratch_cfg["init"] == ""
    assert len(list((out / "results").glob("*.json"))) == 4 * 6
    for png in ("bars-imagenette.png", "fewshot-imagenette.png", "losses.png"):
        assert (out / "report" / png).stat().st_size > 1000

    # re-run: every stage is skipped, nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "pipeline.json"}
    capsys.readouterr()
    pipeline.main(args)
    log = capsys.readouterr().out
    for stage in ("build", "mae", "mae_wsp", "wsp", "random_init", "eval", "report"):  # tiny uses every row
        assert f"[pipeline] {stage}: done, skipped" in log, log
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
