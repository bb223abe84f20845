"""Few-shot linear classification by closed-form L2-regularised least squares (big_vision fewshot_lsr).

For every seed, each class's train rows are permuted once; the first `shots` of every class form
the training set (so the 5-shot set contains the 1-shot set, as big_vision). On those rows:
whiten with their mean/std, append a constant 100 column (the bias, barely regularised), regress
{-1, 1} one-hot targets: W = X^T (X X^T + l2 I)^-1 Y, computed through one eigendecomposition of
the N x N kernel so every l2 in the grid costs a matrix product. Predict argmax(x_val W).

Regulariser: a single `l2_grid` value (default 2**10, big_vision's configs) is used as is. With
several values, each is scored by exact leave-one-out accuracy on the shots (the ridge hat matrix
H gives LOO predictions (ŷ - H_ii y) / (1 - H_ii)) and the best is used: no val or extra labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from maws_eval.config import FewshotConfig
from maws_eval.metrics import top1
from maws_eval.protocol import FeatureSet, Measurement, config_dict

BIAS_CONSTANT = 100.0


def sample_shots(y: torch.Tensor, *, num_classes: int, shots: int, seed: int,
                 classes: Sequence[str] | None = None) -> torch.Tensor:
    """Indices of the first `shots` rows of each class under a seeded permutation.

    `classes` (the dataset's class names: folder names, wnids) name a class that has too few rows."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        if len(idx) < shots:
            name = f"{classes[c]!r} (label {c})" if classes is not None else str(c)
            raise ValueError(f"few-shot: class {name} has {len(idx)} train images, fewer than {shots} shots; "
                             "lower --set fewshot.shots or give that class more train images")
        picked.append(idx[torch.randperm(len(idx), generator=g)][:shots])
    return torch.cat(picked)


def _loo_accuracy(k_nn: torch.Tensor, eigs: torch.Tensor, q: torch.Tensor, y_pm: torch.Tensor, l2: float) -> float:
    # hat matrix H = K (K + l2 I)^-1 = Q diag(e / (e + l2)) Q^T
    hat = (q * (eigs / (eigs + l2))) @ q.T
    pred = hat @ y_pm
    diag = hat.diagonal().unsqueeze(1)
    loo = (pred - diag * y_pm) / (1.0 - diag).clamp_min(1e-12)
    return (loo.argmax(1) == y_pm.argmax(1)).double().mean().item()


def lsr_accuracy(
    x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
    num_classes: int, l2_grid: tuple[float, ...],
) -> tuple[float, float]:
    """(test top-1, l2 used). float64 throughout: eigh on a near-singular kernel needs it."""
    x, x_test = x.double(), x_test.double()
    mean, std = x.mean(0, keepdim=True), x.std(0, unbiased=False, keepdim=True) + 1e-5
    pad = lambda t: torch.nn.functional.pad((t - mean) / std, (0, 1), value=BIAS_CONSTANT)
    x_nd, x_test_md = pad(x), pad(x_test)
    y_pm = 2.0 * torch.nn.functional.one_hot(y, num_classes).double() - 1.0
    k_nn = x_nd @ x_nd.T
    eigs, q = torch.linalg.eigh(k_nn)
    eigs = eigs.clamp_min(0.0)  # round-off can make the PSD kernel's smallest eigenvalues negative
    if len(l2_grid) == 1:
        l2 = l2_grid[0]
    else:
        l2 = max(l2_grid, key=lambda v: (_loo_accuracy(k_nn, eigs, q, y_pm, v), v))
    # W = X^T Q diag(1/(e + l2)) Q^T Y  (the D > N branch of big_vision; exact for any N, D)
    w = (x_nd.T @ q) @ ((q.T @ y_pm) / (eigs + l2).unsqueeze(1))
    return top1(x_test_md @ w, y_test), l2


def run(feats: FeatureSet, cfg: FewshotConfig | None = None) -> list[Measurement]:
    cfg = cfg or FewshotConfig()
    out = []
    for shots in cfg.shots:
        values, chosen = [], []
        for seed in cfg.seeds:
            idx = sample_shots(feats.y_train, num_classes=feats.num_classes, shots=shots, seed=seed,
                               classes=feats.classes)
            acc, l2 = lsr_accuracy(
                feats.x_train[idx], feats.y_train[idx], feats.x_val, feats.y_val,
                num_classes=feats.num_classes, l2_grid=cfg.l2_grid,
            )
            values.append(acc)
            chosen.append(l2)
        out.append(
            Measurement(
                protocol="fewshot", values=tuple(values), seeds=tuple(cfg.seeds), config=config_dict(cfg),
                shots=shots, extra={"chosen_l2": chosen},
            )
        )
    return out
