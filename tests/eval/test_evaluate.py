"""Feature extraction + cache, protocols by name, and fine-tune on real Imagenette images (tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from maws_eval.config import DataConfig, FewshotConfig, FinetuneConfig, LinearConfig
from maws_eval.datasets import DatasetError, open_dataset
from maws_eval.evaluate import ProtocolConfigs, evaluate, feature_set, parse_encoder, with_sha256
from maws_eval.features import extract
from maws_train.checkpoint import export_encoder
from maws_train.models import build_encoder

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
IMAGENETTE = SHARED / "imagenette"
pytestmark = pytest.mark.skipif(not (IMAGENETTE / "train").is_dir(), reason=f"real data absent: {IMAGENETTE}")
DATA = DataConfig(max_train_per_class=4, max_val_per_class=2, batch_size=16)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("enc") / "random-init"
    export_encoder(build_encoder("mu", img_size=32), out, variant="mu", img_size=32)
    return out


def test_dataset_subsample_is_deterministic():
    a, b = open_dataset(IMAGENETTE, DATA), open_dataset(IMAGENETTE, DATA)
    assert a.classes[0] == "n01440764" and len(a.classes) == 10
    assert len(a.train.items) == 40 and len(a.val.items) == 20
    assert a.train.items == b.train.items and a.train.fingerprint() == b.train.fingerprint()
    assert [lab for _, lab in a.train.items] == [c for c in range(10) for _ in range(4)]
    other = open_dataset(IMAGENETTE, DataConfig(max_train_per_class=4, max_val_per_class=2, subsample_seed=1))
    assert other.train.fingerprint() != a.train.fingerprint()


def test_dataset_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match=r"train: no images"):
        open_dataset(tmp_path)


def test_features_are_cached_and_reused(encoder_dir, tmp_path):
    calls = []

    def counting_extractor(module, batches, **kw):
        calls.append(kw["desc"])
        return extract(module, batches, **kw)

    enc = with_sha256(parse_encoder(str(encoder_dir)))
    assert enc.id == "random-init" and len(enc.sha256) == 64
    ds = open_dataset(IMAGENETTE, DATA)
    first = feature_set(enc, ds, data_cfg=DATA, cache_dir=tmp_path, extractor=counting_extractor)
    assert calls == ["random-init/train", "random-init/val"]
    assert first.x_train.shape == (40, 64) and first.x_val.shape == (20, 64)
    assert first.y_train.tolist() == [lab for _, lab in ds.train.items]
    cache_files = sorted(tmp_path.glob("*.safetensors"))
    assert len(cache_files) == 2
    mtimes = [f.stat().st_mtime_ns for f in cache_files]
    second = feature_set(enc, ds, data_cfg=DATA, cache_dir=tmp_path, extractor=counting_extractor)
    assert len(calls) == 2  # no new extraction: both splits came from the cache
    assert [f.stat().st_mtime_ns for f in cache_files] == mtimes
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_val, second.y_val)
    # another train subsample is a miss for train only; val (same files) still hits
    feature_set(enc, open_dataset(IMAGENETTE, DataConfig(max_train_per_class=3, max_val_per_class=2)),
                data_cfg=DATA, cache_dir=tmp_path, extractor=counting_extractor)
    assert calls[2:] == ["random-init/train"]


def test_evaluate_writes_one_result_per_number(encoder_dir, tmp_path):
    enc = with_sha256(parse_encoder(f"floor={encoder_dir}"))
    configs = ProtocolConfigs(linear=LinearConfig(l2_grid=(1e-3, 1e-1)), fewshot=FewshotConfig(shots=(1, 2), seeds=(0, 1)),
                              finetune=FinetuneConfig(steps=3, batch_size=8, seeds=(0,)))
    paths = evaluate([enc], IMAGENETTE, protocols=("linear", "knn", "fewshot", "finetune"), out_dir=tmp_path / "res",
                     configs=configs, data_cfg=DATA, cache_dir=tmp_path / "cache", command="maws-eval all test")
    names = sorted(p.name for p in paths)
    assert names == ["floor.imagenette.fewshot-1shot.json", "floor.imagenette.fewshot-2shot.json",
                     "floor.imagenette.finetune.json", "floor.imagenette.knn.json", "floor.imagenette.linear.json"]
    for p in paths:
        rec = json.loads(p.read_text())
        assert rec["encoder"] == "floor" and rec["encoder_sha256"] == enc.sha256
        assert rec["num_train"] == 40 and rec["num_val"] == 20 and rec["num_classes"] == 10
        assert 0.0 <= rec["value"] <= 1.0 and rec["command"] == "maws-eval all test"
        # every value is a multiple of 1/20: an accuracy over the 20 val images
        assert all(abs(v * 20 - round(v * 20)) < 1e-6 for v in rec["values"])
    ft = json.loads((tmp_path / "res" / "floor.imagenette.finetune.json").read_text())
    assert ft["config"]["steps"] == 3 and ft["seeds"] == [0] and ft["std"] is None
    assert {k: ft["data_config"][k] for k in ("max_train_per_class", "max_val_per_class", "batch_size")} == \
        {"max_train_per_class": 4, "max_val_per_class": 2, "batch_size": 16}
    assert len(ft["final_train_loss"]) == 1 and ft["final_train_loss"][0] > 0
    fs = json.loads((tmp_path / "res" / "floor.imagenette.fewshot-2shot.json").read_text())
    assert fs["shots"] == 2 and fs["seeds"] == [0, 1] and len(fs["values"]) == 2
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate([enc], IMAGENETTE, protocols=("linaer",), out_dir=tmp_path)


def test_shards_as_eval_data(encoder_dir, tiny_build, tmp_path):
    """A `maws-data build` is an eval set: labeled samples only, val by key hash, classes = vocabulary.

    tiny_build (tests/conftest.py): 60 real rows in 4 shards.
    """
    build_dir = Path(tiny_build)
    ds = open_dataset(build_dir, DataConfig(val_fraction=0.3))
    vocab_rows = (build_dir / "vocabulary.tsv").read_text().splitlines()[1:]
    assert ds.classes == tuple(r.split("\t")[1] for r in vocab_rows)
    n_train, n_val = len(ds.train.items), len(ds.val.items)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    assert n_train > n_val > 0
    assert n_train + n_val == sum(s["labeled"] for s in manifest["shards"])
    assert ds.skipped.get("unlabeled", 0) == sum(s["samples"] - s["labeled"] for s in manifest["shards"])
    assert {r for r, _ in ds.train.items}.isdisjoint(r for r, _ in ds.val.items)
    again = open_dataset(build_dir, DataConfig(val_fraction=0.3))
    assert again.val.items == ds.val.items and again.val.fingerprint() == ds.val.fingerprint()
    paths = evaluate([parse_encoder(str(encoder_dir))], build_dir, protocols=("knn",), out_dir=tmp_path / "r",
                     data_cfg=DataConfig(val_fraction=0.3), cache_dir=tmp_path / "cache", command="t")
    rec = json.loads(paths[0].read_text())
    assert rec["num_val"] == n_val and rec["num_classes"] == len(ds.classes) and 0 <= rec["value"] <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_features_match_cpu(encoder_dir):
    """On CUDA, extraction runs under bf16 autocast; features must agree with the fp32 CPU ones."""
    from maws_train.checkpoint import load_encoder

    ds = open_dataset(IMAGENETTE, DATA)
    module, _ = load_encoder(encoder_dir)
    batches = list(ds.eval_batches("val", image_size=32, batch_size=8, num_workers=0))
    x_cpu, y_cpu = extract(module, batches, device=torch.device("cpu"))
    x_gpu, y_gpu = extract(module, batches, device=torch.device("cuda"))
    assert x_gpu.dtype == torch.float32 and x_gpu.device.type == "cpu"
    assert torch.equal(y_cpu, y_gpu)
    cos = torch.nn.functional.cosine_similarity(x_cpu, x_gpu, dim=1)
    assert cos.min().item() > 0.99, cos.min().item()


def test_timm_checkpoint_file_is_an_encoder(tmp_path):
    """A bare timm/MAWS-format .pth (no encoder.json) is scored too: architecture from tensor shapes."""
    torch.manual_seed(1)
    model = build_encoder("mu", img_size=32)
    torch.save({"model": model.state_dict()}, tmp_path / "released_mu.pth")
    enc = parse_encoder(str(tmp_path / "released_mu.pth"))
    assert enc.id == "released_mu"
    feats = feature_set(enc, open_dataset(IMAGENETTE, DATA), data_cfg=DATA, cache_dir=None)
    assert feats.x_train.shape == (40, 64)
    model.eval()
    first = open_dataset(IMAGENETTE, DATA).eval_batches("train", image_size=32, batch_size=4, num_workers=0)
    images, _ = next(iter(first))
    with torch.no_grad():
        assert torch.allclose(feats.x_train[:4], model(images), atol=1e-5)
