"""AdamW with MAE's parameter groups and a per-step linear-warmup + cosine learning rate."""

from __future__ import annotations

import math

import torch
from torch import nn

from maws_train.config import OptimConfig

# Position tables are never decayed: frozen sin-cos in MAE (so not optimised at all), and learned ones
# (WSP) are excluded by every supervised ViT recipe (timm/DeiT `no_weight_decay`).
_POS_NAMES = ("pos_embed", "decoder_pos_embed")
# Learned tokens. MAE's reference (timm 0.3.2 `add_weight_decay`, no skip list) decays them like any
# tensor with ndim > 1; `OptimConfig.decay_tokens=False` keeps them out instead.
_TOKEN_NAMES = ("cls_token", "reg_token", "mask_token")


def param_groups(model: nn.Module, weight_decay: float, *, decay_tokens: bool = True) -> list[dict]:
    """Two groups: decayed tensors, and (1-d params: norm weights, biases; position tables) without decay.

    With `decay_tokens` (the MAE reference) cls/mask/reg tokens are decayed, otherwise not.
    Frozen parameters (MAE's fixed sin-cos tables) are left out of the optimizer entirely.
    """
    skip = _POS_NAMES if decay_tokens else _POS_NAMES + _TOKEN_NAMES
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or leaf in skip or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, lr: float) -> torch.optim.AdamW:
    fused = all(p.is_cuda for p in model.parameters())  # fused AdamW kernel on GPU, foreach on CPU
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, decay_tokens=cfg.decay_tokens), lr=lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None
    )


def lr_at(step: int, *, peak: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """lr for optimizer step `step` (0-based): linear ramp to `peak` over warmup, then half-cosine to min_lr.

    The ramp is MAE's `lr_sched.adjust_learning_rate` counted in steps: step s < W gets peak * s / W
    (step 0 runs at lr 0, as in the reference), step W gets peak.
    """
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
