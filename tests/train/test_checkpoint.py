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
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'other.pth'}: cannot infer the ViT architecture"):
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


# ---------------------------------------------------------------------------------------------------
# Released weights in their exact formats (issue 13: items 10-12)
# ---------------------------------------------------------------------------------------------------


def test_maws_finetuned_b16_512_loads_at_224_with_pos_embed_resampled(tmp_path):
    """MAWS's `vit_b16_512.pt`: a timm ViT-B/16 state dict at 512 px with its 1000-class head, torch.save'd."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    released = timm.create_model("vit_base_patch16_224", img_size=512, num_classes=1000).eval()
    torch.save(released.state_dict(), tmp_path / "vit_b16_512.pt")
    enc, info = load_encoder(tmp_path / "vit_b16_512.pt", img_size=224)
    assert (info["variant"], info["img_size"], info["native_img_size"]) == ("b16", 224, 512)
    assert enc.pos_embed.shape == (1, 197, 768) and "head.weight" in info["dropped_keys"]
    assert any("32x32 to a 14x14 patch grid" in n for n in info["notes"]), info["notes"]
    expected = resample_abs_pos_embed(released.pos_embed.detach(), new_size=[14, 14], num_prefix_tokens=1)
    assert torch.equal(enc.pos_embed.detach(), expected)
    assert torch.equal(enc.pos_embed[:, :1], released.pos_embed[:, :1])  # the cls row is kept as is
    assert torch.equal(enc.blocks[3].mlp.fc1.weight, released.blocks[3].mlp.fc1.weight)
    # at its own size nothing is resampled and the features are the released model's pooled output
    same, info = load_encoder(tmp_path / "vit_b16_512.pt")
    assert info["img_size"] == 512 and info["notes"] == []
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        assert torch.allclose(same.eval()(x), released.forward_head(released.forward_features(x), pre_logits=True),
                              atol=1e-5)


def test_our_export_loads_at_another_size(exported):
    _, run = exported
    bigger, info = load_encoder(run, img_size=64)
    assert bigger.pos_embed.shape == (1, 1 + 8 * 8, 64) and info["native_img_size"] == 32
    assert info["kwargs"]["img_size"] == 64 and "from 32 px to 64 px" in info["notes"][0]
    with pytest.raises(CheckpointError, match="not a multiple of the mu patch size 8"):
        load_encoder(run, img_size=60)


def test_a_rectangular_patch_grid_is_refused_naming_the_file(tmp_path):
    """pos_embed over 1 cls + 4x6 patches (a 32x48 px model): the grid's shape is not in the file, so it is
    neither inferred nor resampled (a guess would load wrong positions); the error names the file."""
    from maws_train import wsp

    state = build_encoder("mu", img_size=32).state_dict()
    state["pos_embed"] = torch.randn(1, 1 + 4 * 6, 64)
    torch.save(state, tmp_path / "rect.pth")
    for kwargs in ({}, {"variant": "mu", "img_size": 32}):
        with pytest.raises(CheckpointError, match=rf"{tmp_path / 'rect.pth'}: pos_embed has 25 tokens.*square"):
            load_encoder(tmp_path / "rect.pth", **kwargs)
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'rect.pth'}: pos_embed has 25 tokens.*4x4 grid"):
        wsp.init_from(build_encoder("mu", img_size=32), str(tmp_path / "rect.pth"))


def test_mae_finetuned_global_pool_layout_is_mapped_and_said(tmp_path):
    """MAE main_finetune.py with --global_pool: `fc_norm.*` after the mean patch token, no `norm.*`, a head;
    saved as {"model": ..., "optimizer": ..., "epoch": ..., "scaler": ..., "args": Namespace}."""
    import argparse

    from maws_train.models import encoder_kwargs

    torch.manual_seed(2)
    mae_ft = timm.create_model("vit_tiny_patch16_224", **encoder_kwargs("mu", img_size=32, global_pool="avg"),
                               num_classes=1000).eval()
    state = mae_ft.state_dict()
    assert "fc_norm.weight" in state and not any(k.startswith("norm.") for k in state)  # MAE's layout exactly
    torch.save({"model": state, "epoch": 99, "args": argparse.Namespace(global_pool=True, nb_classes=1000)},
               tmp_path / "mae_finetuned.pth")
    enc, info = load_encoder(tmp_path / "mae_finetuned.pth")
    assert info["kwargs"]["global_pool"] == "avg" and any("fc_norm" in n for n in info["notes"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = mae_ft.fc_norm(mae_ft.forward_features(x)[:, 1:].mean(1))  # MAE's forward_features(global_pool)
        assert torch.allclose(enc.eval()(x), want, atol=1e-6)
    # the fine-tune protocol rebuilds the model from info["kwargs"]: same pooling there
    rebuilt = timm.create_model(info["timm_name"], **info["kwargs"], num_classes=0)
    rebuilt.load_state_dict(enc.state_dict())


def test_mae_pretraining_script_checkpoint_with_args_loads_pickle_safe(tmp_path):
    """MAE main_pretrain.py's misc.save_model: {"model", "optimizer", "epoch", "scaler", "args": argparse.Namespace};
    MAE's key names are ours without the "encoder." prefix (models_mae.py)."""
    import argparse

    from maws_train.models import MaskedAutoencoder

    torch.manual_seed(3)
    mae = MaskedAutoencoder(build_encoder("mu", img_size=32), decoder_dim=32, decoder_depth=1, decoder_heads=2)
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    mae(torch.randn(2, 3, 32, 32))[0].backward()
    opt.step()
    args = argparse.Namespace(model="mae_vit_base_patch16", input_size=32, mask_ratio=0.75, norm_pix_loss=True,
                              blr=1.5e-4, output_dir="./output_dir", device="cuda", resume="")
    model_state = {k.removeprefix("encoder."): v for k, v in mae.state_dict().items()}
    torch.save({"model": model_state, "optimizer": opt.state_dict(), "epoch": 799,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 0}, "args": args}, tmp_path / "checkpoint-799.pth")
    enc, info = load_encoder(tmp_path / "checkpoint-799.pth")
    assert info["variant"] == "mu" and "mask_token" in info["dropped_keys"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc.eval()(x), mae.encoder.eval()(x))


class NotAllowed:  # a class the unpickler must still refuse
    pass


def test_other_pickled_objects_are_still_refused(tmp_path):
    torch.save({"model": build_encoder("mu", img_size=32).state_dict(), "args": NotAllowed()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_encoder(tmp_path / "evil.pth")
