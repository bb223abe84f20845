"""Typed, frozen configs for every protocol, with defaults documented where they come from.

The CLI overrides fields with `--set key=value` (see `override`); the resolved config is stored in
every result JSON under "config".
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

PROTOCOLS = ("linear", "knn", "fewshot", "finetune")


@dataclass(frozen=True)
class DataConfig:
    """How images become tensors for feature extraction (the same for every encoder)."""

    img_size: int = 0  # 0: the encoder's own img_size (from encoder.json / the timm model)
    max_train_per_class: int = 0  # 0: all; otherwise a seeded per-class subsample (tiny presets)
    max_val_per_class: int = 0
    subsample_seed: int = 0
    batch_size: int = 64
    num_workers: int = 0  # 0 keeps extraction in-process (2-core machines); raise on big hosts
    val_fraction: float = 0.2  # shards only: held-out share of labeled samples when no --val-data


@dataclass(frozen=True)
class LinearConfig:
    """Multinomial logistic regression on standardised frozen features, full-batch L-BFGS.

    The L2 weight is chosen on a stratified `holdout_fraction` of train, then the classifier is
    refit on all of train and scored on val (the DINOv2 log-regression recipe, on CPU in torch).
    """

    l2_grid: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    holdout_fraction: float = 0.2
    max_iter: int = 200
    seeds: tuple[int, ...] = (0,)  # seed of the holdout split; several give a spread


@dataclass(frozen=True)
class KnnConfig:
    """Weighted kNN as DINO (Caron et al. 2021, eval_knn.py): cosine, k=20, T=0.07."""

    k: int = 20
    temperature: float = 0.07
    chunk: int = 1024  # val rows per similarity block: bounds memory at chunk x N_train floats


@dataclass(frozen=True)
class FewshotConfig:
    """Closed-form L2-regularised least squares on {-1,1} one-hot targets (big_vision fewshot_lsr).

    Features are whitened with the shots' mean/std, a constant 100 column carries the bias (large so
    it is barely regularised). `l2_grid` with one value is big_vision's fixed `l2_reg=2**10`; with
    several values the best is chosen by leave-one-out error on the shots themselves (closed form),
    so no extra labels are used.
    """

    shots: tuple[int, ...] = (1, 5, 10)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    l2_grid: tuple[float, ...] = (2.0**10,)


@dataclass(frozen=True)
class FinetuneConfig:
    """Full fine-tuning, the MAE recipe (He et al. 2022, Table 9) scaled down to a small budget.

    AdamW(0.9, 0.999), lr = base_lr * batch_size / 256, layer-wise lr decay, cosine schedule with
    linear warmup, label smoothing, drop path. Augmentation is RandomResizedCrop + flip only (no
    RandAugment/mixup: they need far more steps than this budget to pay off).
    """

    steps: int = 200
    batch_size: int = 32
    base_lr: float = 5e-4
    layer_decay: float = 0.65  # MAE ViT-B value
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05  # MAE: 5 of 100 epochs
    label_smoothing: float = 0.1
    drop_path: float = 0.1
    crop_scale_min: float = 0.2  # milder than MAE fine-tune's 0.08 because the budget is tiny
    seeds: tuple[int, ...] = (0,)
    num_workers: int = 0


T = TypeVar("T")


def _coerce(text: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is tuple:
        inner = typing.get_args(typ)[0]
        return tuple(_coerce(part, inner) for part in text.split(",") if part.strip())
    if typ is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    return typ(text)


def override(cfg: T, assignments: list[str]) -> T:
    """Apply `key=value` strings to a frozen dataclass (`shots=1,5,10` for tuples)."""
    hints = typing.get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{type(cfg).__name__} has no field {key!r}{hint}; fields: {sorted(hints)}")
        try:
            changes[key] = _coerce(value, hints[key])
        except ValueError as e:
            raise ValueError(f"--set {item}: {e}") from e
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
