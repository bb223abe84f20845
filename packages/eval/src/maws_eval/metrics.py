"""Accuracy and spread: the only arithmetic every protocol and the report share."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def top1(scores_or_preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] from (N, C) scores or (N,) predicted class ids."""
    preds = scores_or_preds.argmax(dim=1) if scores_or_preds.ndim == 2 else scores_or_preds
    if preds.shape[0] != labels.shape[0]:
        raise ValueError(f"top1: {preds.shape[0]} predictions for {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("top1: no labels to score")
    return (preds.to(labels.device) == labels).float().mean().item()


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1, as numpy.std(ddof=1)); std is None for one value.

    None rather than 0.0 so a single run never reads as "no spread".
    """
    if not values:
        raise ValueError("mean_std: no values")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def format_value(value: float, std: float | None, *, percent: bool = True) -> str:
    """`71.3 ± 0.4` (percent) or `71.3` when there is no spread."""
    scale = 100.0 if percent else 1.0
    if std is None:
        return f"{value * scale:.1f}"
    return f"{value * scale:.1f} ± {std * scale:.1f}"
