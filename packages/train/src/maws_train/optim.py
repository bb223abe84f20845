"""AdamW with MAE's parameter groups and a per-step linear-warmup + cosine learning rate."""

from __future__ import annotations

import math

import torch
from torch import nn

from maws_train.config import OptimConfig

# Token and position parameters of timm's ViT and our MAE decoder: no weight decay, like norms and biases.
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token", "decoder_pos_embed")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices, and (norm weights, biases, 1-d params, pos embeds, tokens) without decay.

    Frozen parameters (MAE's fixed sin-cos tables) are left out of the optimizer entirely.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or leaf in _NO_DECAY_NAMES or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, lr: float) -> torch.optim.AdamW:
    fused = all(p.is_cuda for p in model.parameters())  # fused AdamW kernel on GPU, foreach on CPU
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None
    )


def lr_at(step: int, *, peak: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """lr for optimizer step `step` (0-based): linear ramp to `peak` over warmup, then half-cosine to min_lr."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
