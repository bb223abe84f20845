"""Score encoders on one dataset with protocols chosen by name; write one result JSON per number.

    evaluate([EncoderRef("mae", "runs/mae"), ...], "data/imagenette", protocols=("linear", "knn"), ...)

Frozen-feature protocols (linear, knn, fewshot) share one feature extraction per (encoder,
dataset, preprocessing), cached on disk (features.py); fine-tune reads images itself.

Cheap checks come first (protocol names, encoder ids and files exist, the dataset tree), the encoder
weights are hashed only after them. An encoder is run at `data.img_size` when that is set, its own
size otherwise; at another size its pos_embed is resampled. Every adjustment (resampled, mapped,
empty class folder left out) is printed and listed under "notes" in each result JSON, and the size
actually used is "image_size".
"""

from __future__ import annotations

import dataclasses
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
    slug,
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
    """`NAME=PATH` or `PATH` (the id is then the run directory's name) → EncoderRef, path as given.

    Only checks that the weights file exists; its sha256 is computed later (`with_sha256`), after the
    other inputs are checked, since hashing a large checkpoint takes minutes."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    weights = weights_file(path)
    if not name:
        name = weights.parent.name if weights.name == ENCODER_WEIGHTS else weights.stem
    return EncoderRef(id=name, path=path)


def with_sha256(enc: EncoderRef) -> EncoderRef:
    return enc if enc.sha256 else dataclasses.replace(enc, sha256=file_sha256(weights_file(enc.path)))


def check_unique_ids(encoders: Sequence[EncoderRef]) -> None:
    """Two encoders with one id (or ids with one file name, `MAE->WSP` / `MAE-WSP`) would overwrite each
    other's result files: refuse, and say how to name them."""
    seen: dict[str, EncoderRef] = {}
    for enc in encoders:
        if (other := seen.get(slug(enc.id))) is not None:
            same = "the id" if other.id == enc.id else f"the ids {other.id!r} and"
            raise ValueError(f"encoders {other.path} and {enc.path} both get {same} {enc.id!r}, so their results "
                             f"would overwrite each other: name them, e.g. A={other.path} B={enc.path}")
        seen[slug(enc.id)] = enc


def encoder_image_size(path: str | Path) -> int | None:
    """img_size from encoder.json beside the weights (no model load), else None."""
    info = weights_file(path).with_name(ENCODER_INFO)
    if weights_file(path).name == ENCODER_WEIGHTS and info.is_file():
        try:
            return int(json.loads(info.read_text())["img_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"encoder {path}: {info} has no valid img_size ({type(e).__name__}: {e}); "
                             "re-export the encoder, or delete that file to have the architecture read from the weights") from None
    return None


def feature_set(enc: EncoderRef, ds: EvalDataset, *, data_cfg: DataConfig, cache_dir: Path | None,
                extractor: Callable[..., tuple[Any, Any]] = extract) -> FeatureSet:
    """Train and val features of `enc` on `ds`; an exported encoder is loaded only on a cache miss."""
    enc = with_sha256(enc)  # the cache key needs it
    module, notes = None, ()
    native = encoder_image_size(enc.path)
    if native is None:  # a bare timm/MAE checkpoint: size and layout come from its tensors
        module, info = load_encoder(enc.path, img_size=data_cfg.img_size or None)
        image_size, notes = int(info["img_size"]), tuple(info["notes"])
    else:
        image_size = data_cfg.img_size or native
        if image_size != native:
            note = (f"{enc.id}: trained at {native} px, run at {image_size} px (data.img_size): pos_embed "
                    "resampled (bicubic) to the new patch grid")
            notes = (note,)

    def compute(split: str):
        nonlocal module
        if module is None:
            module, _ = load_encoder(enc.path, img_size=image_size)
        batches = ds.eval_batches(split, image_size=image_size, batch_size=data_cfg.batch_size,  # type: ignore[arg-type]
                                  num_workers=data_cfg.num_workers)
        total = ds.num_batches(split, batch_size=data_cfg.batch_size)  # type: ignore[arg-type]
        return extractor(module, batches, total=total, desc=f"{enc.id}/{split}")

    out = {}
    for split in ("train", "val"):
        parts = {"format": CACHE_FORMAT, "encoder_sha256": enc.sha256,
                 "dataset": str(ds.split(split).root),  # type: ignore[arg-type]
                 "split": split, "split_fingerprint": ds.split(split).fingerprint(),  # type: ignore[arg-type]
                 "preprocessing": eval_preprocessing(image_size)}
        out[split] = cached(parts, cache_dir, lambda split=split: compute(split))
    return FeatureSet(out["train"][0], out["train"][1], out["val"][0], out["val"][1], classes=ds.classes,
                      image_size=image_size, notes=notes)


def _say(notes: Sequence[str], said: set[str]) -> None:
    for note in notes:
        if note not in said:
            print(f"[maws-eval] note: {note}", flush=True)
            said.add(note)


def evaluate(
    encoders: Sequence[EncoderRef], dataset: str | Path, *, protocols: Sequence[str], out_dir: Path,
    configs: ProtocolConfigs | None = None, data_cfg: DataConfig | None = None,
    cache_dir: Path | None = None, dataset_id: str | None = None, command: str | None = None,
    val_dataset: str | Path | None = None,
) -> list[Path]:
    """Run `protocols` for every encoder; returns the result files written."""
    configs, data_cfg = configs or ProtocolConfigs(), data_cfg or DataConfig()
    # cheap checks first: a typo must not cost a pass over the encoder weights
    if not protocols:
        raise ValueError(f"no protocol to run; choose from {', '.join(PROTOCOLS)}")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    check_unique_ids(encoders)
    for enc in encoders:
        weights_file(enc.path)
    ds = open_dataset(Path(dataset), data_cfg, dataset_id=dataset_id,
                      val_path=Path(val_dataset) if val_dataset is not None else None)
    said: set[str] = set()
    if ds.skipped:
        _say([f"{ds.path}: left out {ds.skipped}"], said)
    _say(ds.notes, said)
    ds_ref = DatasetRef(id=ds.id, path=ds.path, num_train=len(ds.train.items), num_val=len(ds.val.items),
                        num_classes=len(ds.classes))
    command = command or current_command()
    written = []
    for enc in map(with_sha256, encoders):
        measurements: list[Measurement] = []
        if any(p in FEATURE_PROTOCOLS for p in protocols):
            feats = feature_set(enc, ds, data_cfg=data_cfg, cache_dir=cache_dir)
            _say(feats.notes, said)
            loaded = {"image_size": feats.image_size, "notes": list(feats.notes)}
            for name in protocols:
                if name in FEATURE_PROTOCOLS:
                    measurements += [dataclasses.replace(m, extra={**m.extra, **loaded})
                                     for m in FEATURE_PROTOCOLS[name](feats, getattr(configs, name))]
        if "finetune" in protocols:
            ft = finetune.run(enc.path, ds, configs.finetune, data_cfg=data_cfg)
            _say([n for m in ft for n in m.extra["notes"]], said)
            measurements += ft
        for m in measurements:
            record = result_record(m, encoder=enc, dataset=ds_ref, command=command, data_config=config_dict(data_cfg))
            record["notes"] = [*ds.notes, *record.get("notes", [])]
            written.append(write_result(record, out_dir))
    return written
