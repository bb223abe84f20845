"""Linear probe: multinomial logistic regression on frozen features, L2 chosen on a split of train.

Solver: full-batch L-BFGS (strong-Wolfe line search) on mean cross-entropy + l2/2 * ||W||^2 over
standardised features (train mean/std), bias unregularised. The problem is convex, so the answer
depends only on the data and l2 — the seed only picks the holdout split. For each seed: fit on
(1 - holdout_fraction) of train for every l2 in the grid, keep the best holdout top-1, refit on all
of train with it, report top-1 on val.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maws_eval.config import LinearConfig
from maws_eval.metrics import top1
from maws_eval.protocol import FeatureSet, Measurement, config_dict


def stratified_holdout(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit_idx, holdout_idx): `fraction` of every class held out (>=1 when a class has >=2 rows)."""
    g = torch.Generator().manual_seed(seed)
    fit, hold = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_hold = max(1, round(fraction * len(idx))) if len(idx) >= 2 else 0
        hold.append(idx[:n_hold])
        fit.append(idx[n_hold:])
    return torch.cat(fit).sort().values, torch.cat(hold).sort().values


def fit_logreg(
    x: torch.Tensor, y: torch.Tensor, *, num_classes: int, l2: float, max_iter: int,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (D, C) and bias (C,) of L2-regularised softmax regression.

    Starts from zeros, or from `init` (a neighbouring l2's solution: the problem is strictly convex,
    so the optimum is the same and the sweep converges in far fewer iterations).
    """
    w0, b0 = init if init is not None else (torch.zeros(x.shape[1], num_classes), torch.zeros(num_classes))
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-5, tolerance_change=1e-9,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _standardise(x_fit: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean = x_fit.mean(0, keepdim=True)
    std = x_fit.std(0, keepdim=True) + 1e-6  # +eps: dead feature dimensions of a random encoder
    return [(t - mean) / std for t in (x_fit, *others)]


def probe_once(feats: FeatureSet, cfg: LinearConfig, seed: int) -> tuple[float, float, dict[str, float]]:
    """(val top-1, chosen l2, holdout top-1 per l2) for one holdout split."""
    x, y = feats.x_train.float(), feats.y_train
    fit_idx, hold_idx = stratified_holdout(y, cfg.holdout_fraction, seed)
    if len(hold_idx) == 0:
        raise ValueError("linear probe: every class has a single train example, nothing to hold out")
    x_fit, x_hold = _standardise(x[fit_idx], x[hold_idx])
    sweep: dict[str, float] = {}
    solution = None
    # strongest regulariser first: its solution is the easiest, and warm-starts the next weaker one
    for l2 in sorted(cfg.l2_grid, reverse=True):
        solution = fit_logreg(x_fit, y[fit_idx], num_classes=feats.num_classes, l2=l2, max_iter=cfg.max_iter,
                              init=solution)
        sweep[repr(l2)] = top1(x_hold @ solution[0] + solution[1], y[hold_idx])
    # ties go to the stronger regulariser: the safer choice when the holdout cannot tell them apart
    best_l2 = max(cfg.l2_grid, key=lambda l2: (sweep[repr(l2)], l2))
    x_all, x_val = _standardise(x, feats.x_val.float())
    w, b = fit_logreg(x_all, y, num_classes=feats.num_classes, l2=best_l2, max_iter=cfg.max_iter)
    return top1(x_val @ w + b, feats.y_val), best_l2, sweep


def run(feats: FeatureSet, cfg: LinearConfig | None = None) -> list[Measurement]:
    cfg = cfg or LinearConfig()
    values, chosen, sweeps = [], [], []
    for seed in cfg.seeds:
        acc, l2, sweep = probe_once(feats, cfg, seed)
        values.append(acc)
        chosen.append(l2)
        sweeps.append(sweep)
    return [
        Measurement(
            protocol="linear", values=tuple(values), seeds=tuple(cfg.seeds), config=config_dict(cfg),
            extra={"chosen_l2": chosen, "holdout_top1": sweeps},
        )
    ]
