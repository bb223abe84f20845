"""Fine-tune: full fine-tuning of the encoder plus a new linear head, small budget, MAE recipe.

Recipe (He et al. 2022, Appendix A.3 / facebookresearch/mae main_finetune.py, scaled down):
  - model: timm VisionTransformer rebuilt from the encoder's info (timm_name + kwargs) with
    num_classes = the dataset's classes and drop_path; encoder weights loaded, head
    trunc-normal(std=2e-5) as MAE
  - AdamW(0.9, 0.999), weight decay 0.05 (not on biases, norms, pos/cls embeddings), lr = base_lr *
    batch_size / 256, layer-wise lr decay (timm.optim.param_groups_layer_decay: layer i of L gets
    decay^(L + 1 - i)), linear warmup then cosine to 0, counted in steps rather than epochs
  - cross-entropy with label smoothing; RandomResizedCrop + flip (maws_data.transforms recipe)
  - top-1 on val with the eval transform after the last step; one run per seed
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import timm
import torch
import torch.nn.functional as F
from maws_data.transforms import torchvision_transform
from maws_train.checkpoint import load_encoder
from timm.optim import param_groups_layer_decay

from maws_eval.config import DataConfig, FinetuneConfig
from maws_eval.datasets import EvalDataset
from maws_eval.features import pick_device
from maws_eval.metrics import top1
from maws_eval.protocol import Measurement, config_dict


def lr_at(step: int, *, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to `peak` (MAE's lr_sched per step: peak * s / W, step 0 at 0), then half-cosine to 0."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_classifier(encoder_path: str, *, num_classes: int, drop_path: float,
                     img_size: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The encoder with a new head, at `img_size` (None: the encoder's own; otherwise its pos_embed is
    resampled, listed in info["notes"])."""
    encoder, info = load_encoder(encoder_path, img_size=img_size)
    model = timm.create_model(info["timm_name"], **info["kwargs"], num_classes=num_classes, drop_path_rate=drop_path)
    missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ValueError(f"{encoder_path}: encoder keys do not fit the classifier (missing {missing}, "
                         f"unexpected {unexpected})")
    torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)
    torch.nn.init.zeros_(model.head.bias)
    return model, info


def _train_batches(ds: EvalDataset, *, image_size: int, cfg: FinetuneConfig, seed: int):
    transform = torchvision_transform("wsp", image_size, crop_scale=(cfg.crop_scale_min, 1.0))
    if ds.num_batches("train", batch_size=cfg.batch_size, drop_last=True) == 0:
        raise ValueError(f"fine-tune: {len(ds.train.items)} train images < batch_size {cfg.batch_size} "
                         "(lower --set finetune.batch_size)")
    generator = torch.Generator().manual_seed(seed)
    # a fresh shuffled epoch each time one is exhausted (one generator: epochs draw different orders)
    return itertools.chain.from_iterable(
        ds.batches("train", transform, batch_size=cfg.batch_size, num_workers=cfg.num_workers, shuffle=True,
                   drop_last=True, generator=generator) for _ in itertools.count())


@torch.inference_mode()
def evaluate_top1(model: torch.nn.Module, ds: EvalDataset, *, image_size: int, data_cfg: DataConfig,
                  device: torch.device) -> float:
    model.eval()
    preds, labels = [], []
    for images, y in ds.eval_batches("val", image_size=image_size, batch_size=data_cfg.batch_size,
                                     num_workers=data_cfg.num_workers):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            preds.append(model(images.to(device)).argmax(1).cpu())
        labels.append(y)
    return top1(torch.cat(preds), torch.cat(labels))


def finetune_once(encoder_path: str, ds: EvalDataset, cfg: FinetuneConfig, *, data_cfg: DataConfig, seed: int,
                  device: torch.device | None = None) -> tuple[float, list[float], dict[str, Any]]:
    """(val top-1, training losses, encoder info incl. the img_size used and notes) of one fine-tuning run,
    at data.img_size when set, else at the encoder's own size."""
    device = device or pick_device()
    torch.manual_seed(seed)
    model, info = build_classifier(encoder_path, num_classes=len(ds.classes), drop_path=cfg.drop_path,
                                   img_size=data_cfg.img_size or None)
    model.to(device)
    image_size = int(info["img_size"])
    groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                                      no_weight_decay_list=list(model.no_weight_decay()))
    peak = cfg.base_lr * cfg.batch_size / 256
    opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999))
    warmup = max(1, round(cfg.warmup_fraction * cfg.steps))
    losses: list[float] = []
    model.train()
    batches = _train_batches(ds, image_size=image_size, cfg=cfg, seed=seed)
    for step, (images, y) in zip(range(cfg.steps), batches):
        lr = lr_at(step, total=cfg.steps, warmup=warmup, peak=peak)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(images.to(device)), y.to(device), label_smoothing=cfg.label_smoothing)
        if not torch.isfinite(loss):
            raise RuntimeError(f"fine-tune of {encoder_path}: loss is {loss.item()} at step {step} (lr {lr:.2e})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return evaluate_top1(model, ds, image_size=image_size, data_cfg=data_cfg, device=device), losses, info


def run(encoder_path: str, ds: EvalDataset, cfg: FinetuneConfig | None = None, *,
        data_cfg: DataConfig | None = None) -> list[Measurement]:
    cfg, data_cfg = cfg or FinetuneConfig(), data_cfg or DataConfig()
    values, last_losses, info = [], [], {}
    for seed in cfg.seeds:
        acc, losses, info = finetune_once(encoder_path, ds, cfg, data_cfg=data_cfg, seed=seed)
        values.append(acc)
        last_losses.append(sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan"))
    return [Measurement(protocol="finetune", values=tuple(values), seeds=tuple(cfg.seeds), config=config_dict(cfg),
                        extra={"final_train_loss": last_losses, "image_size": info.get("img_size"),
                               "notes": list(info.get("notes", []))})]
