"""What every evaluation protocol shares: the feature set it reads and the result it writes.

A protocol is a function `run(features, cfg) -> list[Measurement]` (fine-tune reads images instead
of features). `result_record` turns a measurement into the JSON result a user keeps:

    {"encoder", "encoder_path", "encoder_sha256", "dataset", "dataset_path", "protocol", "metric",
     "value", "std", "values", "seeds", "shots", "config", "data_config", "command", "created",
     "num_train", "num_val", "num_classes"}

`config` is the protocol's settings, `data_config` how the images were read (per-class limits, image
size, batch size, ...): with `command`, enough to reproduce the number. `value` is a fraction in [0, 1]; `std` is the sample std over `values` (one per seed), null for a
single run. The report only aggregates these files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from maws_eval.metrics import mean_std

RESULT_FIELDS = (
    "encoder", "encoder_path", "encoder_sha256", "dataset", "dataset_path", "protocol", "metric",
    "value", "std", "values", "seeds", "shots", "config", "command", "created",
    "num_train", "num_val", "num_classes",
)


@dataclass(frozen=True)
class FeatureSet:
    """Frozen features of one encoder on one dataset: x (N, D) float32, y (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    classes: tuple[str, ...]
    image_size: int = 0  # the size the images were fed at (0: not recorded)
    notes: tuple[str, ...] = ()  # adjustments made to load the encoder (pos_embed resampled, layout mapped)

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("val", self.x_val, self.y_val)):
            if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(f"{split} features {tuple(x.shape)} do not match labels {tuple(y.shape)}")
        if self.x_train.shape[1] != self.x_val.shape[1]:
            raise ValueError(f"train dim {self.x_train.shape[1]} != val dim {self.x_val.shape[1]}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Measurement:
    """One number (with its per-seed values) produced by one protocol."""

    protocol: str
    values: tuple[float, ...]
    seeds: tuple[int, ...]
    config: dict[str, Any]
    metric: str = "top1"
    shots: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        return mean_std(self.values)[0]

    @property
    def std(self) -> float | None:
        return mean_std(self.values)[1]


@dataclass(frozen=True)
class EncoderRef:
    """An encoder to evaluate: a short id for tables and the path it was loaded from."""

    id: str
    path: str
    sha256: str = ""


@dataclass(frozen=True)
class DatasetRef:
    id: str
    path: str
    num_train: int
    num_val: int
    num_classes: int


def current_command() -> str:
    """The command line that produced a result, as a user would type it."""
    prog = Path(sys.argv[0]).name if sys.argv else "python"
    return shlex.join([prog, *sys.argv[1:]])


def result_record(m: Measurement, *, encoder: EncoderRef, dataset: DatasetRef, command: str,
                  data_config: dict[str, Any] | None = None) -> dict[str, Any]:
    record = {
        "encoder": encoder.id,
        "encoder_path": encoder.path,
        "encoder_sha256": encoder.sha256,
        "dataset": dataset.id,
        "dataset_path": dataset.path,
        "protocol": m.protocol,
        "metric": m.metric,
        "value": m.value,
        "std": m.std,
        "values": list(m.values),
        "seeds": list(m.seeds),
        "shots": m.shots,
        "config": m.config,
        "data_config": data_config,
        "command": command,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "num_train": dataset.num_train,
        "num_val": dataset.num_val,
        "num_classes": dataset.num_classes,
    }
    record.update(m.extra)
    return record


def slug(text: str) -> str:
    """File-name-safe form of an id (`MAE->WSP` -> `MAE-WSP`)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or "x"


def result_filename(record: dict[str, Any]) -> str:
    shots = f"-{record['shots']}shot" if record.get("shots") is not None else ""
    return f"{slug(record['encoder'])}.{slug(record['dataset'])}.{record['protocol']}{shots}.json"


def write_json_atomic(obj: Any, path: Path) -> Path:
    """Write JSON to a temp file beside `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_result(record: dict[str, Any], out_dir: Path) -> Path:
    missing = [k for k in RESULT_FIELDS if k not in record]
    if missing:
        raise ValueError(f"result record lacks {missing}")
    return write_json_atomic(record, Path(out_dir) / result_filename(record))


def load_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Read result JSON files; directories are searched for `*.json` (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.json")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"result path {p} does not exist")
    records = []
    for f in files:
        try:
            record = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from e
        missing = [k for k in ("encoder", "protocol", "metric", "value") if k not in record]
        if missing:
            raise ValueError(f"{f}: not a maws-eval result (missing {missing})")
        record["_file"] = str(f)
        records.append(record)
    return records


def config_dict(cfg: Any) -> dict[str, Any]:
    """A frozen dataclass config as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
