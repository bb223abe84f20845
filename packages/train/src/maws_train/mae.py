"""The MAE pre-pretraining loop: `run(cfg) -> run directory`.

    maws-train mae mu_mae --set data.shards=out/build --out runs/mu_mae          # CPU, seconds
    torchrun --nproc_per_node=8 -m maws_train.cli mae b16_mae --set data.shards=DIR --out runs/b16_mae

Reads as the run goes: setup -> data -> model -> parallelize -> optimizer -> resume -> loop (lr, step,
log, NaN guard, checkpoint) -> export. Outputs in the run directory: config.json (resolved config),
metrics.jsonl, ckpt/step_NNNNNN/ (resumable state), encoder.safetensors + encoder.json (the MAE encoder).

Determinism: all randomness is a function of (seed, step, rank) and the loader's (seed, epoch, sample):
the masking noise is drawn for the whole global batch from a generator seeded with (seed, step), and
each rank takes the rows the loader dealt it (the loader deals each step's global batch in contiguous chunks:
rank r holds global rows r*N .. (r+1)*N - 1, maws_data.loader.plan), so a resumed run
and a run on a different number of processes see the same masks for the same images.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from maws_data.loader import LoaderConfig, build_loader
from tqdm import tqdm

from maws_train import checkpoint, distributed, resume
from maws_train.config import MAEConfig, peak_lr, to_dict
from maws_train.metrics import MetricWriter, NonFiniteLossError, check_finite, write_config
from maws_train.models import MaskedAutoencoder, build_encoder
from maws_train.optim import build_optimizer, lr_at
from maws_train.resume import endless, find_resume_point, step_seed


def mask_noise(*, seed: int, step: int, global_batch: int, num_patches: int, d: distributed.Dist) -> torch.Tensor:
    """This rank's (N, L) masking noise: its chunk of rows (r*N .. (r+1)*N - 1, the rows the loader deals it)
    of one (seed, step)-seeded global draw."""
    g = torch.Generator(device="cpu").manual_seed(step_seed(seed, step))
    noise = torch.rand(global_batch, num_patches, generator=g)
    local = global_batch // d.world_size
    return noise[d.rank * local : (d.rank + 1) * local].to(d.device, non_blocking=True)


def run(cfg: MAEConfig) -> Path:
    # ---------------------------------------------------------------- setup
    d = distributed.init()
    out = Path(cfg.run.out)
    if d.world_size > 1 and cfg.data.batch_size % d.world_size:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by {d.world_size} processes")
    local_batch = cfg.data.batch_size // d.world_size
    torch.manual_seed(cfg.run.seed)

    # ---------------------------------------------------------------- data
    loader = build_loader(
        LoaderConfig(
            shards=cfg.data.shards,
            task="mae",
            batch_size=local_batch,
            image_size=cfg.model.img_size,
            backend=cfg.data.backend,
            num_workers=cfg.data.num_workers,
            seed=cfg.run.seed,
        ),
        rank=d.rank,
        world_size=d.world_size,
    )
    total_steps = cfg.run.steps or max(1, math.ceil(cfg.run.epochs * loader.batches_per_epoch))
    warmup_steps = int(cfg.optim.warmup_frac * total_steps)
    lr_peak = peak_lr(cfg.optim, cfg.data.batch_size)

    # ---------------------------------------------------------------- model
    encoder = build_encoder(cfg.model.variant, img_size=cfg.model.img_size, drop_path_rate=cfg.model.drop_path)
    raw = MaskedAutoencoder(
        encoder,
        decoder_dim=cfg.decoder.dim,
        decoder_depth=cfg.decoder.depth,
        decoder_heads=cfg.decoder.heads,
        mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss,
    ).to(d.device)
    blocks = [*raw.encoder.blocks, *raw.decoder_blocks]
    model = distributed.parallelize(raw, d=d, mode=cfg.run.parallel, compile=cfg.run.compile, compile_mode=cfg.run.compile_mode, blocks=blocks)
    optimizer = build_optimizer(raw, cfg.optim, lr=lr_peak)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda" and cfg.run.precision == "bf16")

    # ---------------------------------------------------------------- resume
    start_step, last_ckpt = 0, None
    resume_dir = find_resume_point(out, cfg.run.resume)
    if resume_dir is not None:
        meta = resume.restore(resume_dir, model=raw, optimizer=optimizer, loader=loader, config=to_dict(cfg),
                              kind="mae", d=d)
        start_step, last_ckpt = int(meta["step"]), resume_dir
        distributed.print0(f"resumed from {resume_dir} at step {start_step}")
    resolved = {"kind": "mae", **to_dict(cfg), "derived": {
        "world_size": d.world_size, "local_batch": local_batch, "lr": lr_peak, "total_steps": total_steps,
        "warmup_steps": warmup_steps, "batches_per_epoch": loader.batches_per_epoch,
        "num_patches": raw.num_patches, "num_visible": raw.num_keep}}
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
    bar = tqdm(total=total_steps, initial=start_step, desc="mae", disable=not d.is_main, dynamic_ncols=True)
    t_last, seen_since = time.perf_counter(), 0
    for step in range(start_step, total_steps):
        lr = lr_at(step, peak=lr_peak, total_steps=total_steps, warmup_steps=warmup_steps, min_lr=cfg.optim.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(cfg.run.seed, step, d.rank))  # drop-path etc.: a function of the step
        images, _ = next(batches)
        images = images.to(d.device, non_blocking=True)
        noise = mask_noise(seed=cfg.run.seed, step=step, global_batch=cfg.data.batch_size,
                           num_patches=raw.num_patches, d=d)
        with autocast:
            loss, _, _ = model(images, noise)
        # Average over ranks for the log and the NaN guard: every rank must agree to stop. (A sync point.)
        loss_avg = distributed.all_reduce_sum(loss.detach().float().clone()).item() / d.world_size
        check_finite(loss_avg, step=step, run_dir=out, last_ckpt=last_ckpt)
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
            metrics.write({"step": done, "loss": loss_avg, "lr": lr, "img_per_s": img_s, "epoch": loader.epoch})
            bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
            t_last, seen_since = now, 0
        bar.update(1)
        if done % cfg.run.ckpt_every == 0 or done == total_steps:
            last_ckpt = save(done)
    bar.close()

    # ---------------------------------------------------------------- export
    full = distributed.model_state(raw)  # every rank takes part (FSDP2 gathers shards)
    if d.is_main:
        export = build_encoder(cfg.model.variant, img_size=cfg.model.img_size)
        export.load_state_dict({k.removeprefix("encoder."): v for k, v in full.items() if k.startswith("encoder.")})
        checkpoint.export_encoder(export, out, variant=cfg.model.variant, img_size=cfg.model.img_size)
        distributed.print0(f"MAE encoder written to {out / checkpoint.ENCODER_WEIGHTS}")
    distributed.barrier()
    distributed.shutdown()
    return out
