"""Typed, frozen run configs. Presets (presets.py) build them; the CLI overrides fields with `--set a.b=v`.

Batch sizes are GLOBAL (summed over ranks) so that a preset means the same run on 1 or N processes;
the per-rank batch and the learning rate are derived (`lr = base_lr * batch_size / 256`, as MAE).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from maws_train.models.vit import get_variant


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "b16"  # key of maws_train.models.VARIANTS
    img_size: int = 224
    drop_path: float = 0.0  # stochastic depth in the encoder (MAE pre-training uses none)

    def __post_init__(self) -> None:
        v = get_variant(self.variant)
        if self.img_size % v.patch_size:
            raise ValueError(f"model.img_size {self.img_size} is not a multiple of patch size {v.patch_size}")


@dataclass(frozen=True)
class DecoderConfig:
    dim: int = 512  # MAE's light decoder at every paper size
    depth: int = 8
    heads: int = 16


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float = 1.5e-4  # per 256 images; lr = base_lr * data.batch_size / 256
    min_lr: float = 0.0  # floor of the cosine
    weight_decay: float = 0.05  # not applied to norms, biases (1-d tensors) or position embeddings
    # MAE reference (timm 0.3.2 add_weight_decay): cls/mask tokens are decayed like every tensor with
    # ndim > 1. False: keep them out of weight decay (this project's choice before 2026-12).
    decay_tokens: bool = True
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_frac: float = 0.05  # linear warmup (peak*s/W at step s, as MAE) over this fraction of the steps, then cosine
    grad_clip: float = 0.0  # max global grad norm; 0 = off (MAE uses none)

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"optim.warmup_frac must be in [0, 1), got {self.warmup_frac}")


@dataclass(frozen=True)
class DataConfig:
    shards: str = ""  # a `maws-data build` output directory
    batch_size: int = 4096  # global, over all ranks
    backend: Literal["auto", "dali", "webdataset"] = "auto"
    num_workers: int = 8
    resample: Literal["none", "sqrt"] = "none"  # WSP only: sqrt class resampling in the loader


@dataclass(frozen=True)
class RunConfig:
    out: str = "runs/unnamed"
    epochs: float = 1.0  # used when steps == 0
    steps: int = 0  # total optimizer steps; 0 = epochs * batches per epoch
    seed: int = 0
    log_every: int = 10  # metrics.jsonl line every N steps
    ckpt_every: int = 1000  # training checkpoint every N steps (and at the end)
    keep_ckpts: int = 2
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast on CUDA; CPU always runs fp32
    compile: bool = False  # torch.compile on CUDA
    # torch.compile mode: "max-autotune" searches kernel configs (and uses CUDA graphs) for more speed
    # at a much longer first step; "reduce-overhead" only adds CUDA graphs
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # FSDP2 (fully_shard per block) for the large sizes
    resume: str = "auto"  # "auto" (latest ckpt in out), "never", or a ckpt/run directory


@dataclass(frozen=True)
class MAEConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True


@dataclass(frozen=True)
class WSPConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(base_lr=1e-3 * 256 / 8192, weight_decay=0.1))
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=8192))
    run: RunConfig = field(default_factory=RunConfig)
    init: str = ""  # MAE run dir / encoder.safetensors / ckpt step dir; "" = WSP from scratch


Config = MAEConfig | WSPConfig


def peak_lr(optim: OptimConfig, batch_size: int) -> float:
    return optim.base_lr * batch_size / 256


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _coerce(raw: str, tp: Any, key: str) -> Any:
    """Parse a CLI string into the field's annotated type (int, float, bool, str, Literal)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if raw not in typing.get_args(tp):
            raise ValueError(f"--set {key}={raw}: expected one of {typing.get_args(tp)}")
        return raw
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}={raw}: expected true/false")
    if tp in (int, float):
        try:
            return float(raw) if tp is float else int(raw)  # float() also takes "inf" / "nan"
        except ValueError:
            raise ValueError(f"--set {key}={raw}: expected {tp.__name__}") from None
    return raw


def override(cfg: Any, assignments: list[str]) -> Any:
    """Apply `a.b=value` assignments to a (nested) frozen dataclass, type-checked against annotations."""
    for assignment in assignments:
        if "=" not in assignment:
            raise ValueError(f"--set expects key=value, got {assignment!r}")
        key, raw = assignment.split("=", 1)
        cfg = _replace_path(cfg, key.strip().split("."), raw.strip(), key)
    return cfg


def _replace_path(obj: Any, path: list[str], raw: str, key: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise ValueError(f"--set {key}: {type(obj).__name__} has no field {path[0]!r}; fields: {', '.join(sorted(names))}")
    current = getattr(obj, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"--set {key}: {path[0]!r} is not a section")
        return dataclasses.replace(obj, **{path[0]: _replace_path(current, path[1:], raw, key)})
    if dataclasses.is_dataclass(current):
        raise ValueError(f"--set {key}: {path[0]!r} is a section; set one of its fields")
    hints = typing.get_type_hints(type(obj))
    return dataclasses.replace(obj, **{path[0]: _coerce(raw, hints[path[0]], key)})
