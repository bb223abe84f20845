"""WSP classifier: the encoder's pooled feature (final-norm cls token) -> linear logits over the vocabulary.

The head sits outside the timm module so the encoder stays exactly the release format (no head keys)
and `export_encoder` can save `model.encoder` as is.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class Classifier(nn.Module):
    """encoder + `head` (Linear D -> num_classes), zero-initialised (like big_vision's ViT head), so training
    starts from the uniform prediction."""

    def __init__(self, encoder: VisionTransformer, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.encoder = encoder
        self.head = nn.Linear(encoder.num_features, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images_NCHW: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> logits (N, num_classes)."""
        return self.head(self.encoder(images_NCHW))


def multilabel_softmax_ce(logits_NC: torch.Tensor, targets_NC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax cross-entropy against the multi-hot target normalised to sum 1 (Mahajan et al. 2018, SWAG).

    Returns (sum of per-row losses over labelled rows, number of labelled rows). Rows whose target is all
    zero (no kept synset) carry no label: they are left out of the loss rather than given a uniform or
    zero target; the caller divides by the labelled count (global under DDP).
    """
    targets_NC = targets_NC.float()
    row_mass_N = targets_NC.sum(dim=1)
    labelled_N = row_mass_N > 0
    target_dist_NC = targets_NC / row_mass_N.clamp_min(1e-12).unsqueeze(1)
    logprobs_NC = torch.log_softmax(logits_NC.float(), dim=1)
    per_row_N = -(target_dist_NC * logprobs_NC).sum(dim=1)
    return (per_row_N * labelled_N).sum(), labelled_N.sum()
