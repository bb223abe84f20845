"""Protocols on synthetic features whose answer is known: separable -> ~100%, random -> chance."""

from __future__ import annotations

import json

import pytest
import torch
from maws_eval import fewshot, knn, linear_probe
from maws_eval.config import FewshotConfig, KnnConfig, LinearConfig, override
from maws_eval.metrics import mean_std, top1
from maws_eval.protocol import DatasetRef, EncoderRef, FeatureSet, load_results, result_record, write_result

NUM_CLASSES = 5


def _blobs(n_per_class: int, dim: int, *, separation: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around random class centres; `separation` scales the centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(NUM_CLASSES, dim, generator=torch.Generator().manual_seed(1234)) * separation
    y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    return x, y


def _features(separation: float) -> FeatureSet:
    x_tr, y_tr = _blobs(40, 32, separation=separation, seed=0)
    x_va, y_va = _blobs(40, 32, separation=separation, seed=1)
    return FeatureSet(x_tr, y_tr, x_va, y_va, classes=tuple(f"c{i}" for i in range(NUM_CLASSES)))


SEPARABLE = _features(separation=3.0)
RANDOM = _features(separation=0.0)  # labels independent of features
CHANCE = 1.0 / NUM_CLASSES


def test_linear_probe_picks_l2_on_train_only():
    """Shuffling the val labels must not change the L2 chosen (nor the holdout curve): val only scores."""
    feats = _features(separation=0.7)
    perm = torch.randperm(len(feats.y_val), generator=torch.Generator().manual_seed(0))
    shuffled = FeatureSet(feats.x_train, feats.y_train, feats.x_val, feats.y_val[perm], classes=feats.classes)
    cfg = LinearConfig(l2_grid=(1e-4, 1e-2, 1.0, 100.0), seeds=(0, 1))
    a, b = linear_probe.run(feats, cfg)[0], linear_probe.run(shuffled, cfg)[0]
    assert a.extra["chosen_l2"] == b.extra["chosen_l2"] and a.extra["holdout_top1"] == b.extra["holdout_top1"]
    assert a.value > b.value + 0.2  # the val labels do matter for the score itself


def test_linear_probe_separable_and_random():
    m = linear_probe.run(SEPARABLE, LinearConfig(l2_grid=(1e-4, 1e-2)))[0]
    assert m.protocol == "linear" and m.value >= 0.99
    assert m.extra["chosen_l2"][0] in (1e-4, 1e-2)
    r = linear_probe.run(RANDOM, LinearConfig(l2_grid=(1e-2,), seeds=(0, 1)))[0]
    assert abs(r.value - CHANCE) < 0.12, r.value
    assert r.std is not None and len(r.values) == 2


def test_stratified_holdout_keeps_every_class():
    y = torch.arange(4).repeat_interleave(10)
    fit, hold = linear_probe.stratified_holdout(y, 0.2, seed=3)
    assert len(hold) == 8 and len(fit) == 32
    assert torch.bincount(y[hold]).tolist() == [2, 2, 2, 2]
    assert set(fit.tolist()).isdisjoint(hold.tolist())


def test_knn_separable_random_and_exact_vote():
    assert knn.run(SEPARABLE)[0].value >= 0.99
    assert abs(knn.run(RANDOM)[0].value - CHANCE) < 0.12
    # hand-checkable case: query is closest to two class-1 points, one class-0 point is further away
    x_train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    y_train = torch.tensor([1, 1, 0])
    pred = knn.knn_predict(x_train, y_train, torch.tensor([[1.0, 0.05], [0.0, 1.0]]), num_classes=2,
                           cfg=KnnConfig(k=3))
    assert pred.tolist() == [1, 0]


def test_fewshot_separable_random_and_nested_shots():
    ms = fewshot.run(SEPARABLE, FewshotConfig(shots=(1, 5, 10), seeds=(0, 1, 2)))
    assert [m.shots for m in ms] == [1, 5, 10]
    assert all(len(m.values) == 3 and m.std is not None for m in ms)
    assert ms[-1].value >= 0.99 and ms[1].value >= 0.95
    rs = fewshot.run(RANDOM, FewshotConfig(shots=(10,), seeds=(0, 1, 2, 3, 4)))
    assert abs(rs[0].value - CHANCE) < 0.12
    one = fewshot.sample_shots(SEPARABLE.y_train, num_classes=NUM_CLASSES, shots=1, seed=7)
    five = fewshot.sample_shots(SEPARABLE.y_train, num_classes=NUM_CLASSES, shots=5, seed=7)
    assert set(one.tolist()) <= set(five.tolist())  # 1-shot draw is inside the 5-shot draw
    with pytest.raises(ValueError, match="fewer than 41 shots"):
        fewshot.sample_shots(SEPARABLE.y_train, num_classes=NUM_CLASSES, shots=41, seed=0)


def test_fewshot_matches_primal_ridge_and_loo_grid():
    x, y = SEPARABLE.x_train[:50], SEPARABLE.y_train[:50]
    # primal solution (X^T X + l2 I)^-1 X^T Y must give the same predictions as the kernel form
    acc, l2 = fewshot.lsr_accuracy(x, y, SEPARABLE.x_val, SEPARABLE.y_val, num_classes=NUM_CLASSES, l2_grid=(8.0,))
    xd = x.double()
    mean, std = xd.mean(0, keepdim=True), xd.std(0, unbiased=False, keepdim=True) + 1e-5
    pad = lambda t: torch.nn.functional.pad((t.double() - mean) / std, (0, 1), value=100.0)
    xp = pad(xd)
    yp = 2.0 * torch.nn.functional.one_hot(y, NUM_CLASSES).double() - 1
    w = torch.linalg.solve(xp.T @ xp + 8.0 * torch.eye(xp.shape[1], dtype=torch.float64), xp.T @ yp)
    assert acc == pytest.approx(top1(pad(SEPARABLE.x_val) @ w, SEPARABLE.y_val))
    assert l2 == 8.0
    _, chosen = fewshot.lsr_accuracy(x, y, SEPARABLE.x_val, SEPARABLE.y_val, num_classes=NUM_CLASSES,
                                     l2_grid=(1e-3, 1.0, 1e3))
    assert chosen in (1e-3, 1.0, 1e3)


def test_mean_std_and_override():
    assert mean_std([0.5]) == (0.5, None)
    m, s = mean_std([0.2, 0.4])
    assert m == pytest.approx(0.3) and s == pytest.approx(0.1414213, rel=1e-5)
    cfg = override(FewshotConfig(), ["shots=1,2", "l2_grid=4.0"])
    assert cfg.shots == (1, 2) and cfg.l2_grid == (4.0,)
    with pytest.raises(ValueError, match="did you mean 'shots'"):
        override(FewshotConfig(), ["shot=1"])


def test_result_json_round_trip(tmp_path):
    m = knn.run(SEPARABLE)[0]
    rec = result_record(m, encoder=EncoderRef("MAE->WSP", "/x/encoder.safetensors", "ab"),
                        dataset=DatasetRef("synthetic", "/d", 200, 200, NUM_CLASSES), command="maws-eval knn")
    path = write_result(rec, tmp_path)
    assert path.name == "MAE-WSP.synthetic.knn.json"
    loaded = json.loads(path.read_text())
    assert loaded["value"] == m.value and loaded["config"]["k"] == 20 and loaded["std"] is None
    assert load_results([tmp_path])[0]["encoder"] == "MAE->WSP"
