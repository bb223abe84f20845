"""Models: the timm ViT encoder table, the MAE wrapper and the WSP classifier."""

from maws_train.models.heads import Classifier, multilabel_softmax_ce
from maws_train.models.mae import MaskedAutoencoder, sincos_pos_embed_2d
from maws_train.models.vit import VARIANTS, Variant, build_encoder, encoder_kwargs, get_variant

__all__ = [
    "VARIANTS",
    "Classifier",
    "MaskedAutoencoder",
    "Variant",
    "build_encoder",
    "encoder_kwargs",
    "get_variant",
    "multilabel_softmax_ce",
    "sincos_pos_embed_2d",
]
