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
    """Linear warmup to `peak`, then half-cosine to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_classifier(encoder_path: str, *, num_classes: int, drop_path: float) -> tuple[torch.nn.Module, dict[str, Any]]:
    encoder, info = load_encoder(encoder_path)
    model = timm.create_model(info["timm_name"], **info["kwargs"], num_classes=num_classes, drop_path_rate=drop_path)
    missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise RuntimeError(f"{encoder_path}: encoder keys do not fit the classifier (missing {missing}, "
                           f"unexpected {unexpected})")
    torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)
    torch.nn.init.zeros_(model.head.bias)
    return model, info


def _train_batches(ds: EvalDataset, *, image_size: int, cfg: FinetuneConfig, seed: int):
    transform = torchvision_transform("wsp", image_size, crop_scale=(cfg.crop_scale_min, 1.0))
    loader = torch.utils.data.DataLoader(
        ds.torch_dataset("train", transform), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
        num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(seed),
    )
    if len(loader) == 0:
        raise ValueError(f"fine-tune: {len(ds.train.items)} train images < batch_size {cfg.batch_size}")
    # a fresh shuffled epoch each time the loader is exhausted
    return itertools.chain.from_iterable(loader for _ in itertools.count())


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
                  device: torch.device | None = None) -> tuple[float, list[float]]:
    """(val top-1, training losses) of one fine-tuning run."""
    device = device or pick_device()
    torch.manual_seed(seed)
    model, info = build_classifier(encoder_path, num_classes=len(ds.classes), drop_path=cfg.drop_path)
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
    return evaluate_top1(model, ds, image_size=image_size, data_cfg=data_cfg, device=device), losses


def run(encoder_path: str, ds: EvalDataset, cfg: FinetuneConfig | None = None, *,
        data_cfg: DataConfig | None = None) -> list[Measurement]:
    cfg, data_cfg = cfg or FinetuneConfig(), data_cfg or DataConfig()
    values, last_losses = [], []
    for seed in cfg.seeds:
        acc, losses = finetune_once(encoder_path, ds, cfg, data_cfg=data_cfg, seed=seed)
        values.append(acc)
        last_losses.append(sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan"))
    return [Measurement(protocol="finetune", values=tuple(values), seeds=tuple(cfg.seeds), config=config_dict(cfg),
                        extra={"final_train_loss": last_losses})]
