"""Score encoders on one dataset with protocols chosen by name; write one result JSON per number.

    evaluate([EncoderRef("mae", "runs/mae"), ...], "data/imagenette", protocols=("linear", "knn"), ...)

Frozen-feature protocols (linear, knn, fewshot) share one feature extraction per (encoder,
dataset, preprocessing), cached on disk (features.py); fine-tune reads images itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maws_train.checkpoint import ENCODER_INFO, ENCODER_WEIGHTS, load_encoder

from maws_eval import fewshot, finetune, knn, linear_probe
from maws_eval.config import PROTOCOLS, DataConfig, FewshotConfig, FinetuneConfig, KnnConfig, LinearConfig
from maws_eval.datasets import EvalDataset, eval_preprocessing, open_dataset
from maws_eval.features import cached, extract, file_sha256
from maws_eval.protocol import (
    DatasetRef,
    EncoderRef,
    FeatureSet,
    Measurement,
    config_dict,
    current_command,
    result_record,
    write_result,
)

FEATURE_PROTOCOLS: dict[str, Callable[..., list[Measurement]]] = {
    "linear": linear_probe.run, "knn": knn.run, "fewshot": fewshot.run,
}
CACHE_FORMAT = "maws-eval-features-v1"  # bump when extraction changes meaning (pooling, dtype)


@dataclass(frozen=True)
class ProtocolConfigs:
    linear: LinearConfig = field(default_factory=LinearConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def weights_file(path: str | Path) -> Path:
    """The file whose bytes identify an encoder: DIR/encoder.safetensors or the checkpoint file itself."""
    p = Path(path)
    if p.is_dir():
        p = p / ENCODER_WEIGHTS
    if not p.is_file():
        raise FileNotFoundError(f"encoder {path}: no weights file {p} (is the training run finished?)")
    return p


def parse_encoder(spec: str) -> EncoderRef:
    """`NAME=PATH` or `PATH` (the id is then the run directory's name) → EncoderRef with its sha256."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    weights = weights_file(path)
    if not name:
        name = weights.parent.name if weights.name == ENCODER_WEIGHTS else weights.stem
    return EncoderRef(id=name, path=str(Path(path).resolve()), sha256=file_sha256(weights))


def encoder_image_size(path: str | Path) -> int | None:
    """img_size from encoder.json beside the weights (no model load), else None."""
    info = weights_file(path).with_name(ENCODER_INFO)
    if weights_file(path).name == ENCODER_WEIGHTS and info.is_file():
        return int(json.loads(info.read_text())["img_size"])
    return None


def feature_set(enc: EncoderRef, ds: EvalDataset, *, data_cfg: DataConfig, cache_dir: Path | None,
                extractor: Callable[..., tuple[Any, Any]] = extract) -> FeatureSet:
    """Train and val features of `enc` on `ds`; the encoder is loaded only on a cache miss."""
    module = None
    image_size = data_cfg.img_size or encoder_image_size(enc.path)
    if image_size is None:  # a bare timm checkpoint: the architecture (and size) comes from its shapes
        module, info = load_encoder(enc.path)
        image_size = int(info["img_size"])

    def compute(split: str):
        nonlocal module
        if module is None:
            module, _ = load_encoder(enc.path)
        batches = ds.eval_batches(split, image_size=image_size, batch_size=data_cfg.batch_size,  # type: ignore[arg-type]
                                  num_workers=data_cfg.num_workers)
        n = len(ds.split(split).items)  # type: ignore[arg-type]
        return extractor(module, batches, total=-(-n // data_cfg.batch_size), desc=f"{enc.id}/{split}")

    out = {}
    for split in ("train", "val"):
        parts = {"format": CACHE_FORMAT, "encoder_sha256": enc.sha256, "dataset": ds.path, "split": split,
                 "split_fingerprint": ds.split(split).fingerprint(),  # type: ignore[arg-type]
                 "preprocessing": eval_preprocessing(image_size)}
        out[split] = cached(parts, cache_dir, lambda split=split: compute(split))
    return FeatureSet(out["train"][0], out["train"][1], out["val"][0], out["val"][1], classes=ds.classes)


def evaluate(
    encoders: Sequence[EncoderRef], dataset: str | Path, *, protocols: Sequence[str], out_dir: Path,
    configs: ProtocolConfigs | None = None, data_cfg: DataConfig | None = None,
    cache_dir: Path | None = None, dataset_id: str | None = None, command: str | None = None,
    val_dataset: str | Path | None = None,
) -> list[Path]:
    """Run `protocols` for every encoder; returns the result files written."""
    configs, data_cfg = configs or ProtocolConfigs(), data_cfg or DataConfig()
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    ds = open_dataset(Path(dataset), data_cfg, dataset_id=dataset_id,
                      val_path=Path(val_dataset) if val_dataset is not None else None)
    if ds.skipped:
        print(f"[maws-eval] {ds.path}: left out {ds.skipped}", flush=True)
    ds_ref = DatasetRef(id=ds.id, path=ds.path, num_train=len(ds.train.items), num_val=len(ds.val.items),
                        num_classes=len(ds.classes))
    command = command or current_command()
    written = []
    for enc in encoders:
        measurements: list[Measurement] = []
        if any(p in FEATURE_PROTOCOLS for p in protocols):
            feats = feature_set(enc, ds, data_cfg=data_cfg, cache_dir=cache_dir)
            for name in protocols:
                if name in FEATURE_PROTOCOLS:
                    measurements += FEATURE_PROTOCOLS[name](feats, getattr(configs, name))
        if "finetune" in protocols:
            measurements += finetune.run(enc.path, ds, configs.finetune, data_cfg=data_cfg)
        for m in measurements:
            record = result_record(m, encoder=enc, dataset=ds_ref, command=command, data_config=config_dict(data_cfg))
            written.append(write_result(record, out_dir))
    return written
