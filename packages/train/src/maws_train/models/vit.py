"""The ViT encoder: a timm `VisionTransformer` picked by name from a small size table.

Every model in the MAWS release is a plain timm `VisionTransformer` (cls token, learned-shape
absolute position embedding over cls + patches, pre-norm blocks, final LayerNorm, `global_pool="token"`),
so we build exactly that and keep timm's parameter names. `model(x)` returns the pooled feature:
the final-norm cls token, shape (N, D) with D = `model.num_features`; this is what MAWS evaluates.

Sizes are data: `VARIANTS[name]` -> `Variant`. Variants without a registered timm model (the tiny
"mu" test size, 2B/14, 6.5B/14) are created from the nearest registered name with explicit
architecture kwargs; `encoder_kwargs()` always lists every architecture field, so
`timm.create_model(v.timm_name, **kwargs, num_classes=0)` rebuilds the same module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer


@dataclass(frozen=True)
class Variant:
    """One ViT size. `timm_name` is the registered timm entry point used to build it."""

    timm_name: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


# Paper sizes follow maws/model_builder.py (B/16, L/16, H/14, 2B/14) and the MAWS paper (6.5B/14:
# width 4096, depth 32, 32 heads, MLP 16384). "mu" is a CPU test size that trains in seconds at 32-64 px.
VARIANTS: dict[str, Variant] = {
    "mu": Variant("vit_tiny_patch16_224", patch_size=8, embed_dim=64, depth=2, num_heads=2),
    "ti16": Variant("vit_tiny_patch16_224", patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "s16": Variant("vit_small_patch16_224", patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "b16": Variant("vit_base_patch16_224", patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "l16": Variant("vit_large_patch16_224", patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "h14": Variant("vit_huge_patch14_224", patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "2b14": Variant("vit_huge_patch14_224", patch_size=14, embed_dim=2560, depth=24, num_heads=32),
    "6.5b14": Variant("vit_huge_patch14_224", patch_size=14, embed_dim=4096, depth=32, num_heads=32),
}


def get_variant(name: str) -> Variant:
    """`VARIANTS[name]` with an error that lists the known names."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown ViT variant {name!r}; known: {', '.join(VARIANTS)}") from None


def encoder_kwargs(variant: str, *, img_size: int = 224, **overrides: Any) -> dict[str, Any]:
    """The full timm kwargs (minus `num_classes`) that build `variant` at `img_size`."""
    v = get_variant(variant)
    if img_size % v.patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of the {variant} patch size {v.patch_size}")
    kwargs: dict[str, Any] = {
        "img_size": img_size,
        "patch_size": v.patch_size,
        "embed_dim": v.embed_dim,
        "depth": v.depth,
        "num_heads": v.num_heads,
        "mlp_ratio": v.mlp_ratio,
        "global_pool": "token",
    }
    kwargs.update(overrides)
    return kwargs


def build_encoder(variant: str, *, img_size: int = 224, **overrides: Any) -> VisionTransformer:
    """A headless timm `VisionTransformer` (num_classes=0); `model(x)` -> (N, model.num_features)."""
    kwargs = encoder_kwargs(variant, img_size=img_size, **overrides)
    model = timm.create_model(get_variant(variant).timm_name, pretrained=False, num_classes=0, **kwargs)
    assert isinstance(model, VisionTransformer)
    return model
