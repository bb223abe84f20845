"""Weighted k-nearest-neighbour classification on frozen features, as DINO's eval_knn.py.

Features are L2-normalised (cosine similarity); each val image takes its k most similar train
images, each votes for its label with weight exp(similarity / T). k=20, T=0.07 by default.
Deterministic: no seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maws_eval.config import KnnConfig
from maws_eval.metrics import top1
from maws_eval.protocol import FeatureSet, Measurement, config_dict


def knn_predict(
    x_train: torch.Tensor, y_train: torch.Tensor, x_query: torch.Tensor, *, num_classes: int, cfg: KnnConfig
) -> torch.Tensor:
    """Predicted class per query row, (Q,) int64."""
    train_nd = F.normalize(x_train.float(), dim=1)
    query_qd = F.normalize(x_query.float(), dim=1)
    k = min(cfg.k, train_nd.shape[0])
    preds = []
    for start in range(0, query_qd.shape[0], cfg.chunk):
        sim_qn = query_qd[start : start + cfg.chunk] @ train_nd.T
        top_sim_qk, top_idx_qk = sim_qn.topk(k, dim=1)
        weights_qk = (top_sim_qk / cfg.temperature).exp()
        votes_qc = torch.zeros(sim_qn.shape[0], num_classes).scatter_add_(1, y_train[top_idx_qk], weights_qk)
        preds.append(votes_qc.argmax(dim=1))
    return torch.cat(preds)


def run(feats: FeatureSet, cfg: KnnConfig | None = None) -> list[Measurement]:
    cfg = cfg or KnnConfig()
    preds = knn_predict(feats.x_train, feats.y_train, feats.x_val, num_classes=feats.num_classes, cfg=cfg)
    return [Measurement(protocol="knn", values=(top1(preds, feats.y_val),), seeds=(), config=config_dict(cfg))]
