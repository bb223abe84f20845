"""The MAE and WSP loops end to end on the tiny real build (conftest `tiny_build`: 60 Instagram images, 64 px).

The mu preset is a 2-block ViT at 32 px, 16 images per step: each in-process run takes a second or two;
the subprocess tests (SIGKILL + resume, 2-process gloo) pay mostly for Python/torch start-up.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from maws_train import mae, wsp
from maws_train.checkpoint import CheckpointError, export_encoder, list_states, load_encoder
from maws_train.config import MAEConfig, WSPConfig, override
from maws_train.metrics import NonFiniteLossError
from maws_train.models import build_encoder
from maws_train.presets import get_preset
from safetensors.torch import load_file

MAE_SETS = ["run.steps=30", "run.ckpt_every=10", "run.log_every=5"]


def mae_cfg(build: Path, out: Path, *sets: str) -> MAEConfig:
    return override(get_preset("mu_mae", kind=MAEConfig), [f"data.shards={build}", f"run.out={out}", *MAE_SETS, *sets])


def wsp_cfg(build: Path, out: Path, *sets: str) -> WSPConfig:
    return override(get_preset("mu_wsp", kind=WSPConfig), [f"data.shards={build}", f"run.out={out}", *MAE_SETS, *sets])


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "maws_train.cli", *args]


@pytest.fixture(scope="module")
def mae_run(tiny_build, tmp_path_factory) -> Path:
    """An uninterrupted 30-step MAE run (checkpoints at 10, 20, 30)."""
    return mae.run(mae_cfg(tiny_build, tmp_path_factory.mktemp("mae") / "run"))


def test_mae_loss_falls_and_the_run_is_recorded(mae_run):
    curve = losses(mae_run)
    assert sorted(curve) == [5, 10, 15, 20, 25, 30]
    assert curve[30] < 0.9 * curve[5], curve
    config = json.loads((mae_run / "config.json").read_text())
    assert config["kind"] == "mae" and config["derived"]["num_visible"] == 4 and config["derived"]["num_patches"] == 16
    assert config["run"]["steps"] == 30 and config["optim"]["beta2"] == 0.95
    assert [d.name for d in list_states(mae_run)] == ["step_000020", "step_000030"]  # keep_ckpts=2


def test_mae_export_is_the_trained_encoder_and_timm_loads_it(mae_run):
    import timm

    info = json.loads((mae_run / "encoder.json").read_text())
    model = timm.create_model(info["timm_name"], **info["kwargs"], num_classes=0,
                              checkpoint_path=str(mae_run / "encoder.safetensors"))
    final = load_file(str(mae_run / "ckpt" / "step_000030" / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, final[f"encoder.{key}"]), key
    encoder, _ = load_encoder(mae_run)
    assert torch.equal(encoder.pos_embed, final["encoder.pos_embed"])


def test_sigkilled_mae_run_resumes_to_the_same_weights(mae_run, tiny_build, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(cli("mae", "mu_mae", "--shards", str(tiny_build), "--out", str(out),
                                *[a for s in MAE_SETS for a in ("--set", s)]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "ckpt" / "step_000010" / "state.json"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert not (out / "encoder.safetensors").exists()
    killed_at = int(list_states(out)[-1].name.split("_")[1])
    assert killed_at in (10, 20)

    mae.run(mae_cfg(tiny_build, out))  # resume="auto": continues from the newest checkpoint
    resumed, reference = load_file(str(out / "encoder.safetensors")), load_file(str(mae_run / "encoder.safetensors"))
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    optim_a = load_file(str(out / "ckpt" / "step_000030" / "optim.safetensors"))
    optim_b = load_file(str(mae_run / "ckpt" / "step_000030" / "optim.safetensors"))
    assert all(torch.equal(optim_a[k], optim_b[k]) for k in optim_b)
    assert losses(out) == losses(mae_run)  # same loss at every logged step, no duplicated lines


def test_wsp_init_copies_the_mae_encoder_and_loss_falls(mae_run, tiny_build, tmp_path):
    encoder = build_encoder("mu", img_size=32)
    report = wsp.init_from(encoder, str(mae_run))
    exported = load_file(str(mae_run / "encoder.safetensors"))
    assert sorted(report["loaded"]) == sorted(exported) and report["missing"] == []
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in exported.items())
    # From a training checkpoint the decoder is dropped and reported.
    step_dir = mae_run / "ckpt" / "step_000030"
    report = wsp.init_from(build_encoder("mu", img_size=32), str(step_dir))
    assert any(k.startswith("decoder") for k in report["dropped"]) and "mask_token" in report["dropped"]

    out = wsp.run(wsp_cfg(tiny_build, tmp_path / "wsp", "run.steps=40", "run.ckpt_every=40", f"init={mae_run}"))
    config = json.loads((out / "config.json").read_text())
    vocab_rows = len((tiny_build / "vocabulary.tsv").read_text().splitlines()) - 1
    assert config["derived"]["num_classes"] == vocab_rows
    assert config["derived"]["init"]["loaded"] == len(exported)
    head = load_file(str(out / "ckpt" / "step_000040" / "model.safetensors"))["head.weight"]
    assert head.shape == (vocab_rows, 64)
    curve = losses(out)
    first, last = curve[5], (curve[35] + curve[40]) / 2
    assert last < 0.95 * first, curve


@pytest.mark.parametrize("problem", ["missing", "junk", "wrong_architecture", "deeper"])
def test_bad_wsp_init_is_a_clear_error_and_writes_nothing(tiny_build, tmp_path, problem):
    out = tmp_path / "wsp"
    if problem == "missing":
        init, match = tmp_path / "no_such_run", "not found"
    elif problem == "junk":
        init, match = tmp_path / "junk.pth", "not a readable checkpoint"
        init.write_bytes(b"hello, not a checkpoint")
    elif problem == "deeper":  # same width, one block more: every tensor of ours fits, one block is left over
        export_encoder(build_encoder("mu", img_size=32, depth=3), tmp_path / "deep", variant="mu", img_size=32)
        init, match = tmp_path / "deep", "does not match the model architecture"
    else:
        export_encoder(build_encoder("mu", img_size=32, embed_dim=128), tmp_path / "other", variant="mu", img_size=32)
        init, match = tmp_path / "other", "does not match the model architecture"
    with pytest.raises(CheckpointError, match=match):
        wsp.run(wsp_cfg(tiny_build, out, f"init={init}"))
    assert not out.exists()
    # The CLI turns it into one red line and exit code 2, still writing nothing.
    from maws_train.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["wsp", "mu_wsp", "--shards", str(tiny_build), "--out", str(out),
                                      "--init", str(init)])
    assert result.exit_code == 2 and match in result.output and not out.exists()


def test_interrupted_wsp_run_resumes_to_the_same_weights(tiny_build, tmp_path, capsys):
    """WSP resume: drop the checkpoints after step 10 (as if killed there) and rerun: the final weights,
    optimizer schedule and loader position continue exactly, so the result equals the uninterrupted run."""
    import shutil

    sets = ("run.steps=20", "run.ckpt_every=10", "run.keep_ckpts=0")
    whole = wsp.run(wsp_cfg(tiny_build, tmp_path / "whole", *sets))
    cut = wsp.run(wsp_cfg(tiny_build, tmp_path / "cut", *sets))
    shutil.rmtree(cut / "ckpt" / "step_000020")
    (cut / "encoder.safetensors").unlink()
    capsys.readouterr()
    resumed = wsp.run(wsp_cfg(tiny_build, tmp_path / "cut", *sets))
    assert "at step 10" in capsys.readouterr().out  # resumed, not retrained from step 0
    a, b = load_file(str(whole / "encoder.safetensors")), load_file(str(resumed / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(whole) == losses(resumed)


def test_going_back_to_an_older_step_with_newer_ones_present_is_refused(mae_run, tiny_build, tmp_path):
    """Resuming step 20 while step 30 sits in the same folder would mix two histories (pruning keeps the
    newest steps; resume=auto after a crash would pick the abandoned one): refused, naming step 30."""
    run = tmp_path / "run"
    shutil.copytree(mae_run, run)
    with pytest.raises(CheckpointError, match=r"step 20\) but .* holds newer checkpoints \(step_000030\)"):
        mae.run(mae_cfg(tiny_build, run, f"run.resume={run / 'ckpt' / 'step_000020'}"))
    assert [d.name for d in list_states(run)] == ["step_000020", "step_000030"]  # nothing touched


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_build, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    sets = ("run.steps=8", "run.ckpt_every=2", "run.keep_ckpts=0")
    mae.run(mae_cfg(tiny_build, out, *sets))
    good = load_file(str(out / "ckpt" / "step_000004" / "model.safetensors"))
    shutil.rmtree(out)
    # The same run again, but its 5th update overflows the weights (as an infinite learning rate would).
    adamw_step, updates = torch.optim.AdamW.step, []

    def overflowing_step(self, *args, **kwargs):
        result = adamw_step(self, *args, **kwargs)
        updates.append(1)
        if len(updates) == 5:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    with pytest.raises(NonFiniteLossError, match=r"step 5 .*last good checkpoint: .*step_000004"):
        mae.run(mae_cfg(tiny_build, out, *sets))
    assert list_states(out)[-1].name == "step_000004"
    kept = load_file(str(out / "ckpt" / "step_000004" / "model.safetensors"))
    assert all(torch.equal(kept[k], good[k]) for k in good)


def test_resume_with_other_settings_is_refused(mae_run, tiny_build, tmp_path):
    """A resumed run must be the same run: a changed learning rate or length is refused with every
    difference named; how it logs and checkpoints is free to change."""
    run = tmp_path / "run"
    shutil.copytree(mae_run, run)
    with pytest.raises(CheckpointError, match=r"optim\.base_lr: 0\.02 in the checkpoint, 0\.01 now; run\.steps: 30 "):
        mae.run(mae_cfg(tiny_build, run, "optim.base_lr=0.01", "run.steps=40"))
    with pytest.raises(CheckpointError, match="is a mae checkpoint; this is a wsp run"):
        wsp.run(wsp_cfg(tiny_build, run))
    mae.run(mae_cfg(tiny_build, run, "run.log_every=3", "run.keep_ckpts=3"))  # allowed: resumes (already done)


def torchrun(run, kind: str, build: Path, out: Path, *sets: str) -> None:
    """`maws-train KIND` on 2 gloo processes (one thread each), killed with its workers after 400 s."""
    run(["-m", "maws_train.cli", kind, f"mu_{kind}", "--shards", str(build), "--out", str(out),
         *[a for s in MAE_SETS + list(sets) for a in ("--set", s)]], 400)


@pytest.mark.dist
@pytest.mark.parametrize("kind,parallel", [
    ("mae", "ddp"),
    pytest.param("mae", "fsdp", marks=pytest.mark.slow),
    pytest.param("wsp", "ddp", marks=pytest.mark.slow),
])
def test_two_gloo_processes_match_one_process(tiny_build, tmp_path, kind, parallel, two_gloo_ranks):
    sets = ["run.steps=4", "run.log_every=1", "run.ckpt_every=4", f"run.parallel={parallel}"]
    make_cfg, loop = (mae_cfg, mae) if kind == "mae" else (wsp_cfg, wsp)
    single = loop.run(make_cfg(tiny_build, tmp_path / "one", *sets))
    torchrun(two_gloo_ranks, kind, tiny_build, tmp_path / "two", *sets)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["derived"]["world_size"] == 2 and config["derived"]["local_batch"] == 8
    one, two = losses(single), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert abs(one[step] - two[step]) < 1e-5 * abs(one[step]), (step, one[step], two[step])
    a, b = load_file(str(single / "encoder.safetensors")), load_file(str(tmp_path / "two" / "encoder.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_and_resume_exactly(tiny_build, tmp_path, two_gloo_ranks):
    """2 FSDP2 processes: each checkpoint is one model and one optimizer file per rank (nothing gathered);
    the shards put together are the exported encoder, WSP --init reads them, and a run cut back to its
    step-2 checkpoint and resumed on 2 processes ends with the uninterrupted run's weights and losses."""
    from maws_train.checkpoint import read_init_encoder

    sets = ("run.steps=4", "run.ckpt_every=2", "run.keep_ckpts=0", "run.log_every=1", "run.parallel=fsdp")
    whole = tmp_path / "whole"
    torchrun(two_gloo_ranks, "mae", tiny_build, whole, *sets)
    step2 = whole / "ckpt" / "step_000002"
    assert sorted(p.name for p in step2.iterdir()) == [
        "model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors",
        "optim-00000-of-00002.safetensors", "optim-00001-of-00002.safetensors", "state.json"]
    assert json.loads((step2 / "state.json").read_text())["shards"] == 2
    exported = load_file(str(whole / "encoder.safetensors"))
    init, _, _ = read_init_encoder(whole / "ckpt" / "step_000004")
    assert init.keys() == exported.keys() and all(torch.equal(init[k], exported[k]) for k in exported)

    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "ckpt" / "step_000004")
    for name in ("encoder.safetensors", "encoder.json"):
        (cut / name).unlink()
    torchrun(two_gloo_ranks, "mae", tiny_build, cut, *sets)
    resumed = load_file(str(cut / "encoder.safetensors"))
    assert all(torch.equal(resumed[k], exported[k]) for k in exported)
    assert losses(cut) == losses(whole)


@pytest.mark.gpu
def test_bf16_compiled_cuda_run_tracks_fp32(tiny_build, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    sets = ["run.steps=10", "run.log_every=1", "run.ckpt_every=10"]
    fp32 = losses(mae.run(mae_cfg(tiny_build, tmp_path / "fp32", *sets, "run.precision=fp32")))
    bf16 = losses(mae.run(mae_cfg(tiny_build, tmp_path / "bf16", *sets, "run.precision=bf16", "run.compile=true")))
    assert abs(bf16[1] - fp32[1]) < 0.02 * fp32[1]
    assert bf16[10] < bf16[1]


def test_wsp_init_at_another_size_resamples_and_maps_mae_global_pool(tmp_path):
    """WSP --init from a 32 px encoder into a 64 px WSP model, and from MAE's fine-tuned fc_norm layout."""
    import timm
    from maws_train.models import encoder_kwargs
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    small = build_encoder("mu", img_size=32)
    export_encoder(small, tmp_path / "mae32", variant="mu", img_size=32)
    encoder = build_encoder("mu", img_size=64)
    report = wsp.init_from(encoder, str(tmp_path / "mae32"))
    assert report["missing"] == [] and any("4x4 to a 8x8 patch grid" in n for n in report["notes"])
    want = resample_abs_pos_embed(small.pos_embed.detach(), new_size=[8, 8], num_prefix_tokens=1)
    assert torch.equal(encoder.pos_embed.detach(), want)
    assert wsp.init_summary(report)["notes"] == report["notes"]

    mae_ft = timm.create_model("vit_tiny_patch16_224", **encoder_kwargs("mu", img_size=32, global_pool="avg"),
                               num_classes=10)
    torch.save({"model": mae_ft.state_dict()}, tmp_path / "mae_ft.pth")
    encoder = build_encoder("mu", img_size=32)
    report = wsp.init_from(encoder, str(tmp_path / "mae_ft.pth"))
    assert report["missing"] == [] and any("fc_norm.* loaded as norm.*" in n for n in report["notes"])
    assert torch.equal(encoder.norm.weight, mae_ft.fc_norm.weight)
