"""Exported encoders (timm-loadable, clear errors) and the resumable training state on disk."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from maws_train.checkpoint import (
    CheckpointError,
    export_encoder,
    list_states,
    load_encoder,
    load_state,
    save_state,
)
from maws_train.models import build_encoder


@pytest.fixture()
def exported(tmp_path):
    torch.manual_seed(1)
    enc = build_encoder("mu", img_size=32).eval()
    export_encoder(enc, tmp_path / "run", variant="mu", img_size=32)
    return enc, tmp_path / "run"


def test_timm_create_model_loads_the_export(exported):
    enc, run = exported
    info = json.loads((run / "encoder.json").read_text())
    assert info["variant"] == "mu" and info["img_size"] == 32
    model = timm.create_model(info["timm_name"], **info["kwargs"], num_classes=0,
                              checkpoint_path=str(run / "encoder.safetensors")).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), enc(x))


@pytest.mark.parametrize("form", ["dir", "safetensors", "pth_nested", "pth_ddp_prefixed"])
def test_load_encoder_accepts_dir_file_and_timm_or_maws_checkpoints(exported, tmp_path, form):
    enc, run = exported
    if form == "dir":
        path = run
    elif form == "safetensors":
        path = run / "encoder.safetensors"
    elif form == "pth_nested":  # MAE/timm training-script layout, architecture inferred from shapes
        path = tmp_path / "mae_style.pth"
        torch.save({"model": enc.state_dict()}, path)
    else:
        path = tmp_path / "ddp.pth"
        torch.save({f"module.{k}": v for k, v in enc.state_dict().items()}, path)
    loaded, info = load_encoder(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), enc(x))
    assert (info["variant"], info["img_size"]) == ("mu", 32)


def test_load_encoder_errors_name_the_problem(exported, tmp_path):
    _, run = exported
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder(tmp_path / "nope.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_encoder(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="does not match the model architecture"):
        load_encoder(run, variant="ti16")
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="cannot infer the ViT architecture"):
        load_encoder(tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no encoder.safetensors"):
        load_encoder(tmp_path)


def test_training_state_round_trips_without_pickle_and_keeps_the_newest(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    from maws_train.distributed import model_state, optimizer_state

    for step in (1, 2, 3):
        save_state(tmp_path, step=step, model_state=model_state(model), optim_state=optimizer_state(model, opt),
                   meta={"loader": [{"epoch": 0, "batches": step}]}, keep=2)
    assert [d.name for d in list_states(tmp_path)] == ["step_000002", "step_000003"]
    (tmp_path / "ckpt" / ".tmp-step_000004").mkdir()  # a write cut by a kill: never taken as a checkpoint
    (tmp_path / "ckpt" / "step_000005").mkdir()  # no state.json: incomplete
    assert list_states(tmp_path)[-1].name == "step_000003"
    msd, osd, meta = load_state(list_states(tmp_path)[-1])
    assert meta["step"] == 3 and meta["loader"] == [{"epoch": 0, "batches": 3}]
    assert torch.equal(msd["0.weight"], model[0].weight.detach())
    assert torch.equal(osd["state"]["0.weight"]["exp_avg"], opt.state[model[0].weight]["exp_avg"])
    assert osd["param_groups"][0]["betas"] == (0.9, 0.95)
    for name in ("model.safetensors", "optim.safetensors"):  # safetensors, loadable without torch.load/pickle
        assert (list_states(tmp_path)[-1] / name).read_bytes()[8:9] == b"{"
