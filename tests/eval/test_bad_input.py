"""Bad input to `maws-eval` (issue 13): a clear exit-2 error naming the file/folder/encoder, or a correct
result with a note saying what was adjusted. Real Imagenette JPEGs (symlinked into a tiny tree), tiny
images made here, and checkpoints in the exact formats released weights come in."""

from __future__ import annotations

import argparse
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
import timm
import torch
from maws_eval import evaluate as evaluate_mod
from maws_eval import finetune
from maws_eval.cli import app
from maws_train.checkpoint import export_encoder
from maws_train.models import build_encoder, encoder_kwargs
from PIL import Image
from typer.testing import CliRunner

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
IMAGENETTE = SHARED / "imagenette"
pytestmark = pytest.mark.skipif(not (IMAGENETTE / "train").is_dir(), reason=f"real data absent: {IMAGENETTE}")
CLASSES = sorted(p.name for p in (IMAGENETTE / "train").iterdir())[:3]
FAST = ["--set", "data.batch_size=8", "--no-cache"]


def tree(root: Path, *, train: int = 4, val: int = 2, classes: list[str] = CLASSES) -> Path:
    """A small ImageFolder tree of real Imagenette JPEGs (symlinks, nothing copied)."""
    for split, n in (("train", train), ("val", val)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for f in sorted((IMAGENETTE / split / cls).iterdir())[:n]:
                (root / split / cls / f.name).symlink_to(f)
    return root


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid 1x1 PNG whose IHDR claims width x height (CRC fixed): Pillow's decompression-bomb check fires."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("enc") / "random-init"
    export_encoder(build_encoder("mu", img_size=32), out, variant="mu", img_size=32)
    return out


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result, result.output


def assert_clean_error(result, output: str, *needles: str) -> None:
    assert result.exit_code == 2, output
    assert "Traceback" not in output and "Caught" not in output, output
    for needle in needles:
        assert needle in output, (needle, output)


@pytest.mark.parametrize("bad,protocol,workers", [("bomb", "knn", 0), ("bomb", "knn", 2), ("garbage", "linear", 2),
                                                  ("bomb", "finetune", 2)])
def test_undecodable_image_is_an_exit_2_naming_the_file(encoder, tmp_path, bad, protocol, workers):
    data = tree(tmp_path / "data")
    if bad == "bomb":
        path = bomb_png(data / "train" / CLASSES[1] / "huge.png")
    else:
        path = data / "val" / CLASSES[0] / "broken.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    workers_set = f"finetune.num_workers={workers}" if protocol == "finetune" else f"data.num_workers={workers}"
    result, out = invoke(protocol, str(encoder), "--data", str(data), "--out", str(tmp_path / "res"), *FAST,
                         "--set", workers_set, "--set", "finetune.steps=1", "--set", "finetune.batch_size=13")
    assert_clean_error(result, out, "huge.png" if bad == "bomb" else "broken.jpg")
    assert ("decompression bomb" if bad == "bomb" else "cannot decode image") in out
    assert not (tmp_path / "res").exists()


def test_empty_class_folder_is_left_out_with_a_note(encoder, tmp_path):
    data = tree(tmp_path / "data")
    (data / "train" / "zebra").mkdir()
    (data / "val" / "zebra").mkdir()
    result, out = invoke("knn", str(encoder), "--data", str(data), "--out", str(tmp_path / "res"), *FAST)
    assert result.exit_code == 0, out
    rec = json.loads((tmp_path / "res" / "random-init.data.knn.json").read_text())
    assert rec["num_classes"] == 3 and rec["num_train"] == 12 and rec["num_val"] == 6
    assert any("empty class folder" in n and "zebra" in n for n in rec["notes"]), rec["notes"]
    assert "note:" in out and "zebra" in out
    result, out = invoke("report", str(tmp_path / "res"), "--out", str(tmp_path / "rep"))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "chance = 33.3%" in md and "zebra" in md


@pytest.mark.parametrize("case", ["train_class_missing_from_val", "val_class_not_in_train", "val_class_empty_in_train"])
def test_train_val_class_mismatch_is_an_error_naming_the_folders(encoder, tmp_path, case):
    data = tree(tmp_path / "data")
    if case == "train_class_missing_from_val":
        for f in (data / "val" / CLASSES[2]).iterdir():
            f.unlink()
        needles = ["no val images for train classes", CLASSES[2]]
    else:
        if case == "val_class_empty_in_train":
            (data / "train" / "zebra").mkdir()
        (data / "val" / "zebra").mkdir()
        bomb_png(data / "val" / "zebra" / "z.png", 8, 8)
        needles = ["zebra (" + ("empty" if case == "val_class_empty_in_train" else "absent") + " in train/)"]
    result, out = invoke("knn", str(encoder), "--data", str(data), "--out", str(tmp_path / "res"), *FAST)
    assert_clean_error(result, out, str(data / "val"), *needles)


def test_fewshot_error_names_the_class_folder(encoder, tmp_path):
    data = tree(tmp_path / "data")
    for f in sorted((data / "train" / CLASSES[1]).iterdir())[1:]:
        f.unlink()  # one train image left in this class
    result, out = invoke("fewshot", str(encoder), "--data", str(data), "--out", str(tmp_path / "res"), *FAST,
                         "--set", "fewshot.shots=2")
    assert_clean_error(result, out, f"class '{CLASSES[1]}' (label 1) has 1 train images, fewer than 2 shots")


def test_img_size_other_than_the_encoders_runs_there_and_says_so(encoder, tmp_path, monkeypatch):
    """A 32 px encoder at data.img_size=64: every protocol runs at 64 px (pos_embed resampled) and records it."""
    sizes = []
    real_build = finetune.build_classifier

    def spy(*args, **kwargs):
        model, info = real_build(*args, **kwargs)
        sizes.append(model.patch_embed.img_size)
        return model, info

    monkeypatch.setattr(finetune, "build_classifier", spy)
    data = tree(tmp_path / "data")
    result, out = invoke("all", str(encoder), "--data", str(data), "--out", str(tmp_path / "res"), *FAST,
                         "--set", "data.img_size=64", "--set", "fewshot.shots=1", "--set", "fewshot.seeds=0",
                         "--set", "finetune.steps=2", "--set", "finetune.batch_size=4")
    assert result.exit_code == 0, out
    assert sizes == [(64, 64)]
    files = sorted((tmp_path / "res").glob("*.json"))
    assert [f.name.split(".")[2] for f in files] == ["fewshot-1shot", "finetune", "knn", "linear"]
    for f in files:
        rec = json.loads(f.read_text())
        assert rec["image_size"] == 64 and rec["data_config"]["img_size"] == 64
        assert any("resampled" in n for n in rec["notes"]), (f.name, rec["notes"])
    assert "note:" in out and "resampled" in out
    result, out = invoke("knn", str(encoder), "--data", str(data), "--out", str(tmp_path / "res2"), *FAST,
                         "--set", "data.img_size=60")
    assert_clean_error(result, out, "not a multiple of the mu patch size 8")


def _timm_state(global_pool: str = "token", img_size: int = 64) -> dict[str, torch.Tensor]:
    torch.manual_seed(4)
    kwargs = encoder_kwargs("mu", img_size=img_size, global_pool=global_pool)
    return timm.create_model("vit_tiny_patch16_224", **kwargs, num_classes=1000).state_dict()


@pytest.mark.parametrize("layout", ["timm_state_dict", "mae_finetuned_fc_norm", "mae_script_with_args"])
def test_released_checkpoint_layouts_are_evaluated_and_fine_tuned_at_another_size(tmp_path, layout):
    """A timm ViT saved at 64 px with a 1000-class head (MAWS's vit_b16_512.pt layout, at mu size), MAE's
    fine-tuned global-pool layout (fc_norm), MAE's training-script {"model", "args": Namespace} file: all
    evaluated and fine-tuned at 32 px, with notes."""
    path = tmp_path / f"{layout}.pth"
    if layout == "timm_state_dict":
        torch.save(_timm_state(), path)
    elif layout == "mae_finetuned_fc_norm":
        torch.save({"model": _timm_state("avg"), "epoch": 99}, path)
    else:
        torch.save({"model": _timm_state(), "epoch": 799, "args": argparse.Namespace(input_size=64, blr=1.5e-4)}, path)
    data = tree(tmp_path / "data")
    result, out = invoke("all", str(path), "--data", str(data), "--out", str(tmp_path / "res"), *FAST,
                         "--protocols", "knn,finetune", "--set", "data.img_size=32",
                         "--set", "finetune.steps=2", "--set", "finetune.batch_size=4")
    assert result.exit_code == 0, out
    for protocol in ("knn", "finetune"):
        rec = json.loads((tmp_path / "res" / f"{layout}.data.{protocol}.json").read_text())
        assert rec["image_size"] == 32 and 0.0 <= rec["value"] <= 1.0
        assert any("8x8 to a 4x4 patch grid" in n for n in rec["notes"]), rec["notes"]
        assert any("fc_norm" in n for n in rec["notes"]) == (layout == "mae_finetuned_fc_norm")


def test_two_encoders_with_one_name_are_refused(encoder, tmp_path):
    for parent in ("a", "b"):
        export_encoder(build_encoder("mu", img_size=32), tmp_path / parent / "mae", variant="mu", img_size=32)
    data = tree(tmp_path / "data")
    result, out = invoke("knn", str(tmp_path / "a" / "mae"), str(tmp_path / "b" / "mae"), "--data", str(data),
                         "--out", str(tmp_path / "res"), *FAST)
    assert_clean_error(result, out, str(tmp_path / "a" / "mae"), str(tmp_path / "b" / "mae"), "'mae'", "name them")
    result, out = invoke("knn", f"MAE->WSP={encoder}", f"MAE-WSP={encoder}", "--data", str(data),
                         "--out", str(tmp_path / "res"), *FAST)  # one result file name for both
    assert_clean_error(result, out, "'MAE->WSP' and 'MAE-WSP'")
    assert not (tmp_path / "res").exists()
    result, out = invoke("knn", f"a={tmp_path / 'a' / 'mae'}", f"b={tmp_path / 'b' / 'mae'}", "--data", str(data),
                         "--out", str(tmp_path / "res"), *FAST)
    assert result.exit_code == 0, out
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["a.data.knn.json", "b.data.knn.json"]


def test_empty_protocol_list_is_an_error(encoder, tmp_path):
    result, out = invoke("all", str(encoder), "--data", str(tree(tmp_path / "data")), "--out", str(tmp_path / "r"),
                         "--protocols", ",")
    assert_clean_error(result, out, "--protocols ','", "names no protocol")


@pytest.mark.parametrize("problem", ["missing_data", "not_a_tree", "unknown_protocol", "empty_protocols"])
def test_cheap_inputs_are_checked_before_the_weights_are_hashed(encoder, tmp_path, monkeypatch, problem):
    def no_hashing(path, **kw):
        raise AssertionError(f"hashed {path} before checking the cheap inputs")

    monkeypatch.setattr(evaluate_mod, "file_sha256", no_hashing)
    data, protocols = tree(tmp_path / "data"), "knn"
    if problem == "missing_data":
        data, needle = tmp_path / "nope", "does not exist"
    elif problem == "not_a_tree":
        data, needle = tmp_path, "neither an ImageFolder tree"
    elif problem == "unknown_protocol":
        protocols, needle = "knn,linaer", "unknown protocol"
    else:
        protocols, needle = " , ", "names no protocol"
    result, out = invoke("all", str(encoder), "--data", str(data), "--out", str(tmp_path / "r"),
                         "--protocols", protocols)
    assert_clean_error(result, out, needle)


def test_paths_are_recorded_and_reported_as_given(encoder, tmp_path, monkeypatch):
    real = tree(tmp_path / "real" / "imagenette-mini")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "data").symlink_to(real)
    (tmp_path / "work" / "enc").symlink_to(encoder)
    monkeypatch.chdir(tmp_path / "work")
    result, out = invoke("knn", "enc", "--data", "data", "--out", "res", *FAST)
    assert result.exit_code == 0, out
    rec = json.loads(Path("res/enc.data.knn.json").read_text())
    assert rec["dataset"] == "data" and rec["dataset_path"] == "data" and rec["encoder_path"] == "enc"
    result, out = invoke("report", "res", "--out", "rep")
    assert result.exit_code == 0, out
    md, rep = Path("rep/report.md").read_text(), Path("rep/report.json").read_text()
    assert "images (data)" in md
    assert str(tmp_path) not in md and str(tmp_path) not in rep


def test_report_over_different_subsets_splits_tables_and_warns(encoder, tmp_path):
    data = tree(tmp_path / "data")
    for n in (4, 2):
        result, out = invoke("knn", str(encoder), "--data", str(data), "--out", str(tmp_path / f"res{n}"), *FAST,
                             "--set", f"data.max_train_per_class={n}")
        assert result.exit_code == 0, out
    result, out = invoke("report", str(tmp_path / "res4"), str(tmp_path / "res2"), "--out", str(tmp_path / "rep"))
    assert result.exit_code == 0 and "warning: results for data come from 2 different subsets" in out, out
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert sorted(rep["datasets"]) == ["data [12 train / 6 val]", "data [6 train / 6 val]"]
    assert rep["datasets"]["data [6 train / 6 val]"]["num_train"] == 6 and len(rep["warnings"]) == 1
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "> **Warning:** results for data come from 2 different subsets" in md
    assert "## data [12 train / 6 val]" in md and "## data [6 train / 6 val]" in md
    # one subset: one table under the plain dataset name, no warning
    result, out = invoke("report", str(tmp_path / "res4"), "--out", str(tmp_path / "rep1"))
    rep = json.loads((tmp_path / "rep1" / "report.json").read_text())
    assert list(rep["datasets"]) == ["data"] and rep["warnings"] == [] and "warning" not in out


def test_broken_encoder_json_is_an_exit_2_naming_it(tmp_path):
    export_encoder(build_encoder("mu", img_size=32), tmp_path / "enc", variant="mu", img_size=32)
    (tmp_path / "enc" / "encoder.json").write_text("{truncated")
    result, out = invoke("knn", str(tmp_path / "enc"), "--data", str(tree(tmp_path / "data")),
                         "--out", str(tmp_path / "res"), *FAST)
    assert_clean_error(result, out, str(tmp_path / "enc" / "encoder.json"), "no valid img_size", "re-export")


def test_rectangular_pos_embed_is_an_exit_2_naming_the_file(tmp_path):
    state = _timm_state(img_size=32)
    state["pos_embed"] = torch.randn(1, 1 + 4 * 6, 64)  # a 32x48 px model: 4x6 patches
    torch.save(state, tmp_path / "rect.pth")
    result, out = invoke("knn", str(tmp_path / "rect.pth"), "--data", str(tree(tmp_path / "data")),
                         "--out", str(tmp_path / "res"), *FAST)
    assert_clean_error(result, out, str(tmp_path / "rect.pth"), "pos_embed has 25 tokens", "square")
