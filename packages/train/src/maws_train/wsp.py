"""The WSP loop (weakly supervised pretraining on synset labels): `run(cfg) -> run directory`.

    maws-train wsp mu_wsp --shards out/build --out runs/mu_wsp --init runs/mu_mae   # MAE -> WSP (MAWS)
    maws-train wsp mu_wsp --shards out/build --out runs/mu_wsp_scratch              # WSP from scratch

Forked from mae.py on purpose (one readable loop per objective). Differences: the model is the encoder
plus a linear head over `loader.num_classes` (read from the build's vocabulary.tsv, never configured);
the loss is softmax cross-entropy against the multi-hot target normalised to sum 1; `--init` loads an MAE
encoder first, before anything is written, so a bad --init fails without touching the run directory.

Loss under data parallelism: the loader feeds WSP only labelled samples, but the loss still skips any
all-zero row; each rank divides its summed loss by the GLOBAL labelled count (all-reduced) times the
world size, so DDP's gradient mean equals the single-process gradient of the same global batch.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from maws_data.loader import LoaderConfig, build_loader
from tqdm import tqdm

from maws_train import checkpoint, distributed, resume
from maws_train.config import WSPConfig, peak_lr, to_dict
from maws_train.metrics import MetricWriter, NonFiniteLossError, check_finite, write_config
from maws_train.models import Classifier, build_encoder, multilabel_softmax_ce
from maws_train.optim import build_optimizer, lr_at
from maws_train.resume import endless, find_resume_point, step_seed


def init_from(encoder: torch.nn.Module, path: str) -> dict:
    """Load MAE (or any timm ViT) encoder weights into `encoder`; decoder/head keys are dropped.

    An encoder trained at another image size has its pos_embed resampled to this one's grid; MAE's
    fine-tuned global-pool layout has its `fc_norm.*` loaded as `norm.*` (WSP pools the cls token).
    Both are listed in the report's "notes". Raises CheckpointError (missing file, not a checkpoint,
    wrong architecture). Returns a report of the keys loaded, missing (kept at their fresh init) and dropped.
    """
    state, dropped, source = checkpoint.read_init_encoder(path)
    notes = []
    if "fc_norm.weight" in state:
        state |= {k.replace("fc_norm.", "norm.", 1): state.pop(k) for k in [k for k in state if k.startswith("fc_norm.")]}
        notes.append(f"{source}: MAE global-pool layout: fc_norm.* loaded as norm.* (WSP pools the cls token)")
    if (note := checkpoint.fit_pos_embed(state, encoder, source=str(source))) is not None:
        notes.append(note)
    report = checkpoint.load_into(encoder, state, source=str(source), strict=False)
    if report["unexpected"]:  # encoder tensors with no place here: a deeper model, or other parts
        raise checkpoint.CheckpointError(
            f"--init {path}: {len(report['unexpected'])} encoder tensors have no counterpart in this encoder "
            f"(e.g. {report['unexpected'][:5]}); it does not match the model architecture"
        )
    if report["missing"] and len(report["loaded"]) < len(encoder.state_dict()) // 2:
        raise checkpoint.CheckpointError(
            f"--init {path}: only {len(report['loaded'])} of {len(encoder.state_dict())} encoder tensors found "
            f"(missing e.g. {report['missing'][:5]}); is this an encoder of the same architecture?"
        )
    return {"source": str(source), **report, "dropped": dropped, "notes": notes}


def init_summary(report: dict | None) -> dict | None:
    """What config.json records of --init (a report from `init_from`, or one already summarised)."""
    if report is None or isinstance(report.get("loaded"), int):
        return report
    return {k: report[k] for k in ("source", "missing", "dropped", "notes")} | {"loaded": len(report["loaded"])}


def run(cfg: WSPConfig) -> Path:
    # ---------------------------------------------------------------- setup
    d = distributed.init()
    out = Path(cfg.run.out)
    if d.world_size > 1 and cfg.data.batch_size % d.world_size:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by {d.world_size} processes")
    local_batch = cfg.data.batch_size // d.world_size
    torch.manual_seed(cfg.run.seed)
    resume_dir = find_resume_point(out, cfg.run.resume)

    # ---------------------------------------------------------------- model (+ --init, before any write)
    encoder = build_encoder(cfg.model.variant, img_size=cfg.model.img_size, drop_path_rate=cfg.model.drop_path)
    init_report = None
    if cfg.init and resume_dir is None:
        init_report = init_from(encoder, cfg.init)
        distributed.print0(
            f"--init {init_report['source']}: loaded {len(init_report['loaded'])} encoder tensors, "
            f"missing {init_report['missing'] or 'none'}, dropped {len(init_report['dropped'])} non-encoder tensors"
        )
        for note in init_report["notes"]:
            distributed.print0(f"--init note: {note}")

    # ---------------------------------------------------------------- data
    loader = build_loader(
        LoaderConfig(
            shards=cfg.data.shards,
            task="wsp",
            batch_size=local_batch,
            image_size=cfg.model.img_size,
            backend=cfg.data.backend,
            num_workers=cfg.data.num_workers,
            seed=cfg.run.seed,
            resample=cfg.data.resample,
        ),
        rank=d.rank,
        world_size=d.world_size,
    )
    num_classes = loader.num_classes
    total_steps = cfg.run.steps or max(1, math.ceil(cfg.run.epochs * loader.batches_per_epoch))
    warmup_steps = int(cfg.optim.warmup_frac * total_steps)
    lr_peak = peak_lr(cfg.optim, cfg.data.batch_size)

    raw = Classifier(encoder, num_classes).to(d.device)
    model = distributed.parallelize(raw, d=d, mode=cfg.run.parallel, compile=cfg.run.compile, compile_mode=cfg.run.compile_mode, blocks=list(raw.encoder.blocks))
    optimizer = build_optimizer(raw, cfg.optim, lr=lr_peak)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda" and cfg.run.precision == "bf16")

    # ---------------------------------------------------------------- resume
    start_step, last_ckpt = 0, None
    if resume_dir is not None:
        meta = resume.restore(resume_dir, model=raw, optimizer=optimizer, loader=loader, config=to_dict(cfg),
                              kind="wsp", d=d)
        start_step, last_ckpt = int(meta["step"]), resume_dir
        distributed.print0(f"resumed from {resume_dir} at step {start_step}")
        if cfg.init and (out / "config.json").exists():  # keep the first run's --init report
            init_report = json.loads((out / "config.json").read_text()).get("derived", {}).get("init")
    resolved = {"kind": "wsp", **to_dict(cfg), "derived": {
        "world_size": d.world_size, "local_batch": local_batch, "lr": lr_peak, "total_steps": total_steps,
        "warmup_steps": warmup_steps, "batches_per_epoch": loader.batches_per_epoch, "num_classes": num_classes,
        "init": init_summary(init_report)}}
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config(out, resolved)
    metrics = MetricWriter(out, enabled=d.is_main, resume_step=start_step)

    def save(step: int) -> Path:
        # A finite loss can still be followed by an update that overflows; never checkpoint such weights.
        if not distributed.all_finite(raw):
            raise NonFiniteLossError(f"parameters became non-finite after step {step} in {out}; stopping "
                                     f"(last good checkpoint: {last_ckpt or 'none written yet'})")
        return resume.save(out, step, model=raw, optimizer=optimizer, loader=loader, resolved=resolved, d=d,
                           keep=cfg.run.keep_ckpts)

    # ---------------------------------------------------------------- loop
    model.train()
    batches = endless(loader)
    bar = tqdm(total=total_steps, initial=start_step, desc="wsp", disable=not d.is_main, dynamic_ncols=True)
    t_last, seen_since = time.perf_counter(), 0
    for step in range(start_step, total_steps):
        lr = lr_at(step, peak=lr_peak, total_steps=total_steps, warmup_steps=warmup_steps, min_lr=cfg.optim.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(cfg.run.seed, step, d.rank))
        images, targets = next(batches)
        images = images.to(d.device, non_blocking=True)
        targets = targets.to(d.device, non_blocking=True)
        with autocast:
            logits = model(images)
        loss_sum, labelled = multilabel_softmax_ce(logits, targets)
        # Global labelled count and loss sum: one small all-reduce (also the NaN guard's agreement point).
        totals = distributed.all_reduce_sum(torch.stack([loss_sum.detach().float(), labelled.float()]))
        global_labelled = max(totals[1].item(), 1.0)
        loss_avg = totals[0].item() / global_labelled
        check_finite(loss_avg, step=step, run_dir=out, last_ckpt=last_ckpt)
        loss = loss_sum * (d.world_size / global_labelled)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.optim.grad_clip)
        optimizer.step()

        seen_since += cfg.data.batch_size
        done = step + 1
        if done % cfg.run.log_every == 0 or done == total_steps:
            now = time.perf_counter()
            img_s = seen_since / max(now - t_last, 1e-9)
            metrics.write({"step": done, "loss": loss_avg, "lr": lr, "img_per_s": img_s, "epoch": loader.epoch,
                           "labelled": int(totals[1].item())})
            bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
            t_last, seen_since = now, 0
        bar.update(1)
        if done % cfg.run.ckpt_every == 0 or done == total_steps:
            last_ckpt = save(done)
    bar.close()

    # ---------------------------------------------------------------- export (encoder only; the head stays in ckpt/)
    full = distributed.model_state(raw)
    if d.is_main:
        export = build_encoder(cfg.model.variant, img_size=cfg.model.img_size)
        export.load_state_dict({k.removeprefix("encoder."): v for k, v in full.items() if k.startswith("encoder.")})
        checkpoint.export_encoder(export, out, variant=cfg.model.variant, img_size=cfg.model.img_size)
        distributed.print0(f"WSP encoder written to {out / checkpoint.ENCODER_WEIGHTS}")
    distributed.barrier()
    distributed.shutdown()
    return out
