"""Named run configs. Each paper size has an MAE and a WSP preset; "mu_mae"/"mu_wsp" run the same code
on CPU in seconds (tiny ViT at 32 px) and are what the tests and the smoke pipeline use.

MAE values follow He et al. 2022 (base_lr 1.5e-4 per 256, batch 4096, wd 0.05, betas 0.9/0.95, decoder
512x8) with MAWS's schedule (one epoch over the data, so warmup is a fraction of steps). WSP values
(AdamW, lr 1e-3 at batch 8192, wd 0.1) follow our reading of the MAWS/SWAG setups; treat them as a
starting point, not a reproduction.
"""

from __future__ import annotations

import dataclasses
import difflib

from maws_train.config import (
    Config,
    DataConfig,
    DecoderConfig,
    MAEConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    WSPConfig,
)

_TINY_RUN = RunConfig(steps=40, log_every=5, ckpt_every=20, precision="fp32")
_TINY_DATA = DataConfig(batch_size=16, num_workers=0)


def _mu_mae() -> MAEConfig:
    return MAEConfig(
        model=ModelConfig(variant="mu", img_size=32),
        decoder=DecoderConfig(dim=32, depth=1, heads=2),
        optim=OptimConfig(base_lr=2e-2, warmup_frac=0.1),
        data=_TINY_DATA,
        run=dataclasses.replace(_TINY_RUN, out="runs/mu_mae"),
    )


def _mu_wsp() -> WSPConfig:
    return WSPConfig(
        model=ModelConfig(variant="mu", img_size=32),
        optim=OptimConfig(base_lr=2e-2, weight_decay=0.05, warmup_frac=0.1),
        data=_TINY_DATA,
        run=dataclasses.replace(_TINY_RUN, out="runs/mu_wsp"),
    )


def _paper_mae(variant: str, *, fsdp: bool) -> MAEConfig:
    return MAEConfig(
        model=ModelConfig(variant=variant, img_size=224),
        run=RunConfig(out=f"runs/{variant}_mae", compile=True, parallel="fsdp" if fsdp else "ddp"),
    )


def _paper_wsp(variant: str, *, fsdp: bool) -> WSPConfig:
    return WSPConfig(
        model=ModelConfig(variant=variant, img_size=224),
        run=RunConfig(out=f"runs/{variant}_wsp", compile=True, parallel="fsdp" if fsdp else "ddp"),
    )


PRESETS: dict[str, Config] = {
    "mu_mae": _mu_mae(),
    "mu_wsp": _mu_wsp(),
    **{f"{v}_mae": _paper_mae(v, fsdp=v in ("h14", "2b14", "6.5b14")) for v in ("b16", "l16", "h14", "2b14", "6.5b14")},
    **{f"{v}_wsp": _paper_wsp(v, fsdp=v in ("h14", "2b14", "6.5b14")) for v in ("b16", "l16", "h14", "2b14", "6.5b14")},
}


def get_preset(name: str, *, kind: type) -> Config:
    """The preset `name`, checked to be an MAE or WSP config as `kind` says, with a did-you-mean error."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown preset {name!r}{hint} (known: {', '.join(PRESETS)})")
    cfg = PRESETS[name]
    if not isinstance(cfg, kind):
        raise KeyError(f"preset {name!r} is a {type(cfg).__name__}, not a {kind.__name__}")
    return cfg
