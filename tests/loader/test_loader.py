"""maws_data.loader on the real tiny build (60 Instagram photos at 64 px, shards of 16/16/16/12).

Keys are compared, not just counts: `loader.last_batch_keys` are the keys of the batch just yielded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from maws_data.loader import LoaderConfig, batches_per_epoch, build_loader, open_index
from maws_data.loader.plan import batch_span
from maws_data.sidecar import parse_dali_index

S = 32  # output size: small and fast; the shards hold 64 px images


def cfg(build: Path | str, task: str = "mae", **kw) -> LoaderConfig:
    base = {"batch_size": 4, "image_size": S, "backend": "webdataset", "num_workers": 0}
    return LoaderConfig(shards=str(build), task=task, **{**base, **kw})


def epoch_keys(loader) -> list[list[str]]:
    out = []
    for images, targets in loader:
        assert images.shape[1:] == (3, S, S) and images.dtype == torch.float32
        assert len(targets) == len(images) == len(loader.last_batch_keys)
        out.append(list(loader.last_batch_keys))
    return out


def read_dali_index(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    return parse_dali_index(path.read_text(), str(path))


def shard_json(build: Path) -> dict[str, dict]:
    """Every sample's KEY.json, read independently of the loader with webdataset's tar reader."""
    tars = sorted(str(p) for p in (build / "shards").glob("*.tar"))
    return {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(tars, shardshuffle=False)}


def test_tiny_build_has_unequal_shards(tiny_build):
    sizes = [len(read_dali_index(p)) for p in sorted((tiny_build / "shards").glob("*.idx"))]
    assert sizes == [16, 16, 16, 12] == open_index(str(tiny_build)).samples.tolist()


def test_targets_match_shard_json(tiny_build):
    truth = shard_json(tiny_build)
    vocab_rows = (tiny_build / "vocabulary.tsv").read_text().splitlines()[1:]
    wsp = build_loader(cfg(tiny_build, "wsp"))
    assert wsp.num_classes == len(vocab_rows) == 82
    labeled = [k for k, j in truth.items() if j["labels"]]
    assert wsp.num_samples == len(labeled) == 58  # wsp leaves out the 2 unlabeled photos
    seen = 0
    for _, targets in wsp:
        assert targets.dtype == torch.float32 and targets.shape[1] == wsp.num_classes
        for key, row in zip(wsp.last_batch_keys, targets):
            assert torch.nonzero(row).flatten().tolist() == sorted(truth[key]["labels"])
            seen += 1
    assert seen == 14 * 4
    ev = build_loader(cfg(tiny_build, "eval", drop_last=False))
    firsts = {}
    for _, targets in ev:
        assert targets.dtype == torch.int64
        firsts.update(zip(ev.last_batch_keys, targets.tolist()))
    assert firsts == {k: (j["labels"][0] if j["labels"] else -1) for k, j in truth.items()}


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exact_batches_across_ranks(tiny_build, world_size):
    loaders = [build_loader(cfg(tiny_build, "mae"), rank=r, world_size=world_size) for r in range(world_size)]
    expected = 60 // (world_size * 4)  # 15, 7, 5
    keys = []
    for loader in loaders:
        assert len(loader) == loader.batches_per_epoch == expected
        batches = epoch_keys(loader)
        assert len(batches) == expected and all(len(b) == 4 for b in batches)
        keys += [k for b in batches for k in b]
    assert len(keys) == len(set(keys)) == expected * world_size * 4  # no sample on two ranks


def test_dataloader_workers_keep_plan_order(tiny_build):
    """3 ranks x 3 workers on 4 unequal shards: plan order, exact counts, the same pixels as 0 workers."""
    for rank in range(3):
        multi = build_loader(cfg(tiny_build, "mae", num_workers=3), rank=rank, world_size=3)
        single = build_loader(cfg(tiny_build, "mae", num_workers=0), rank=rank, world_size=3)
        got = [(x, list(multi.last_batch_keys)) for x, _ in multi]
        ref = [(x, list(single.last_batch_keys)) for x, _ in single]
        assert [k for _, k in got] == single.plan_keys(0)
        assert [k for _, k in got] == [k for _, k in ref]
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, ref))


def test_reused_output_buffers_never_overwrite_what_the_caller_keeps(tiny_build):
    """2 workers reuse 4 output buffers each (prefetch 2 + 2). The caller keeps a view of every 3rd
    batch and a numpy array of every 5th and drops the rest: buffers are reused (more pooled batches
    than buffers), a kept buffer is not, and what was kept still equals the in-process pixels."""
    multi = build_loader(cfg(tiny_build, "mae", num_workers=2))
    ref = [x for x, _ in build_loader(cfg(tiny_build, "mae", num_workers=0))]
    kept = {}
    for i, (x, _) in enumerate(multi):
        assert torch.equal(x, ref[i])
        if i % 3 == 0:
            kept[i] = x[1:3]
        elif i % 5 == 0:
            kept[i] = x.numpy()
        del x
    assert len(ref) == 15 and multi.pooled_batches > multi._slots.numel() == 8
    assert 0 < int(multi._slots.sum()) <= len(kept) == 7  # the kept batches' buffers are still held
    assert multi._mapped == {}  # the epoch is over: the main process let go of the workers' buffers...
    for i, v in kept.items():  # ...but what the caller kept is still mapped and intact
        assert np.array_equal(np.asarray(v), ref[i][1:3].numpy() if i % 3 == 0 else ref[i].numpy())
    del v  # the loop variable still holds the last kept batch
    kept.clear()
    assert int(multi._slots.sum()) == 0


@pytest.mark.parametrize("backend", ["webdataset", "dali"])
def test_in_process_buffer_pool_reuses_only_dropped_batches(tiny_build, backend):
    """In-process batches (Pillow with 0 workers, DALI on the CPU) come in 3 reused buffers: 15 batches
    use 3 memory blocks (2 of them taken by the views kept of batches 4 and 9), and the kept views
    still hold their pixels."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    ref = [x for x, _ in build_loader(cfg(tiny_build, "mae", backend=backend))]  # all kept: fresh memory
    loader = build_loader(cfg(tiny_build, "mae", backend=backend))
    kept, addresses, i = {}, set(), 0
    for x, _ in loader:  # not enumerate(): it holds the previous batch while the next one is made
        assert torch.equal(x, ref[i])
        addresses.add(x.data_ptr())
        if i in (4, 9):
            kept[i] = x[2:].clone(), x[2:]
        del x
        i += 1  # noqa: SIM113 (see the loop's comment)
    assert len(ref) == 15 and len(addresses) == 3
    for copy, view in kept.values():
        assert torch.equal(copy, view)


def test_one_shard_more_workers_than_shards(tiny_build):
    """A glob naming one shard, 2 ranks x 3 workers: works (random access), 12 samples -> 1 batch of 4 each."""
    spec = str(tiny_build / "shards" / "shard-000003.tar")
    loaders = [build_loader(cfg(spec, "wsp", num_workers=3), rank=r, world_size=2) for r in range(2)]
    assert loaders[0].num_classes == 82  # vocabulary.tsv found beside shards/
    batches = [epoch_keys(lo) for lo in loaders]
    assert [len(b) for b in batches] == [1, 1]
    assert not set(batches[0][0]) & set(batches[1][0])


def test_eval_every_sample_exactly_once(tiny_build):
    """drop_last=False: 60 samples, 2 ranks x batch 7 = chunks of 7 dealt in turn (8 full, one of 4): 5 batches
    per rank, rank 0's last one short, rank 1's empty; all 60 exactly once."""
    keys, counts = [], []
    for r in range(2):
        loader = build_loader(cfg(tiny_build, "eval", batch_size=7, drop_last=False), rank=r, world_size=2)
        batches = epoch_keys(loader)
        counts.append([len(b) for b in batches])
        keys += [k for b in batches for k in b]
    assert counts == [[7, 7, 7, 7, 4], [7, 7, 7, 7, 0]]
    assert sorted(keys) == sorted(shard_json(tiny_build))
    # eval keeps dataset order: shard order, then tar order within a shard
    loader = build_loader(cfg(tiny_build, "eval", batch_size=7, drop_last=False))
    assert [k for b in epoch_keys(loader) for k in b] == list(shard_json(tiny_build))


def test_eval_short_rank_gets_empty_last_batch():
    """5 samples on 2 ranks, batch 2: chunks [0,1] [2,3] [4] go to ranks 0, 1, 0: rank 1 ends with an empty batch."""
    spans = [[batch_span(b, rank=r, world_size=2, batch_size=2, length=5) for b in range(2)] for r in range(2)]
    assert spans == [[(0, 2), (4, 5)], [(2, 4), (5, 5)]]
    assert batches_per_epoch(5, world_size=2, batch_size=2, drop_last=False) == 2


@pytest.mark.parametrize("backend", ["webdataset", "dali"])
def test_short_rank_yields_its_empty_last_batch(tiny_build, backend):
    """60 samples on 7 ranks, batch 4, drop_last=False: 15 chunks of 4 dealt in turn, rank 0 gets 3, rank 6
    gets 2 and an empty batch, so every rank yields 3 batches and none waits for the others at the end."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    sizes = {}
    for rank in (0, 6):
        loader = build_loader(cfg(tiny_build, "eval", backend=backend, drop_last=False), rank=rank, world_size=7)
        sizes[rank] = [len(x) for x, _ in loader]
        assert len(loader) == 3
    assert sizes == {0: [4, 4, 4], 6: [4, 4, 0]}


def test_epochs_shuffle_deterministically(tiny_build):
    a, b = build_loader(cfg(tiny_build)), build_loader(cfg(tiny_build))
    e0 = epoch_keys(a)
    assert epoch_keys(b) == e0  # same seed, same epoch: same order
    a.set_epoch(1)
    e1 = epoch_keys(a)
    assert e1 != e0 and sorted(k for b in e1 for k in b) == sorted(k for b in e0 for k in b)
    c = build_loader(cfg(tiny_build, seed=1))
    assert epoch_keys(c) != e0


@pytest.mark.parametrize("backend", ["webdataset", "dali"])
def test_resume_mid_epoch(tiny_build, backend):
    """3 of 5 batches, state through JSON, a new loader: exactly the remaining batches, same pixels."""
    ref = build_loader(cfg(tiny_build, "mae", backend=backend), rank=1, world_size=3)
    ref.set_epoch(2)
    full = [(x, list(ref.last_batch_keys)) for x, _ in ref]
    assert len(full) == 5

    first = build_loader(cfg(tiny_build, "mae", backend=backend), rank=1, world_size=3)
    first.set_epoch(2)
    it = iter(first)
    done = [next(it)[0] for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    assert (state["epoch"], state["batches"]) == (2, 3)

    resumed = build_loader(cfg(tiny_build, "mae", backend=backend), rank=1, world_size=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop calls this on resume: it keeps the position
    rest = [(x, list(resumed.last_batch_keys)) for x, _ in resumed]
    assert [k for _, k in rest] == [k for _, k in full[3:]]
    assert all(torch.equal(a, b) for a, (b, _) in zip(done, full[:3]))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(rest, full[3:]))
    # a finished epoch resumes at the start of the next one
    assert (resumed.state_dict()["epoch"], resumed.state_dict()["batches"]) == (3, 0)


def test_dali_keeps_one_pipeline_across_epochs(tiny_build):
    """Three epochs, an early stop and its continuation, all on the first pipeline: every batch equals
    what a fresh loader gives for that epoch. Only a jump (replaying epoch 0) builds a new one."""
    pytest.importorskip("nvidia.dali")

    def run(loader, epoch):
        loader.set_epoch(epoch)
        return [(x, list(loader.last_batch_keys)) for x, _ in loader]

    kept = build_loader(cfg(tiny_build, "mae", backend="dali"), rank=0, world_size=2)
    got = {e: run(kept, e) for e in (0, 1)}
    kept.set_epoch(2)
    it = iter(kept)
    got[2] = [(next(it)[0], list(kept.last_batch_keys)) for _ in range(3)]
    it.close()  # the caller stops mid-epoch, then carries on from the same position
    got[2] += [(x, list(kept.last_batch_keys)) for x, _ in kept]
    assert kept._dali.pipelines_built == 1

    for epoch, batches in got.items():
        fresh = run(build_loader(cfg(tiny_build, "mae", backend="dali"), rank=0, world_size=2), epoch)
        assert [k for _, k in batches] == [k for _, k in fresh] and len(fresh) == len(kept) == 7
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, fresh))
    assert [k for _, k in got[0]] != [k for _, k in got[1]]

    assert [k for _, k in run(kept, 0)] == [k for _, k in got[0]]  # out of order: rebuilt, still right
    assert kept._dali.pipelines_built == 2


def test_process_forked_with_a_live_dali_pipeline_exits_cleanly(tiny_build):
    """The kept pipeline is alive when another loader forks its DataLoader workers; a child that
    collects its copy must not touch DALI's (absent) threads: without the at-fork guard it hangs
    (or, in a DataLoader worker, dies with SIGSEGV). A child that tries to use the loader gets an error
    instead of a hang."""
    pytest.importorskip("nvidia.dali")
    import gc
    import os
    import time

    loader = build_loader(cfg(tiny_build, "mae", backend="dali"))
    it = iter(loader)
    next(it)  # the pipeline is built and running
    pid = os.fork()
    if pid == 0:
        try:  # using the inherited loader is refused (its thread pools have no threads in the child)
            loader.set_epoch(1)
            next(iter(loader))
            os._exit(2)
        except RuntimeError as e:
            if "forked" not in str(e):
                os._exit(3)
        del it, loader
        gc.collect()
        os._exit(0)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung destroying its copy of the DALI pipeline")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert next(it)[0].shape == (4, 3, S, S)  # the parent's pipeline still works


def test_state_from_another_setup_is_refused(tiny_build, tmp_path):
    state = build_loader(cfg(tiny_build, batch_size=4)).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(cfg(tiny_build, batch_size=5)).load_state_dict(state)
    # A rebuild with the same shard names and sample counts but other bytes (here: one vocabulary line
    # changed) is other data: refused too.
    rebuilt = tmp_path / "build"
    shutil.copytree(tiny_build, rebuilt)
    vocab = (rebuilt / "vocabulary.tsv").read_text().splitlines()
    (rebuilt / "vocabulary.tsv").write_text("\n".join([vocab[0], vocab[1].replace("\t", "\tx", 1), *vocab[2:]]) + "\n")
    other = build_loader(cfg(rebuilt, batch_size=4))
    assert other.state_dict()["shards"] == state["shards"] and other.state_dict()["samples"] == state["samples"]
    with pytest.raises(ValueError, match="was .* rebuilt"):
        other.load_state_dict(state)
    build_loader(cfg(tiny_build, batch_size=4)).load_state_dict(state)  # the same shards: accepted


def test_a_version_2_state_resumes_as_the_plan_without_reader_heads(tiny_build):
    """Version 2 states (shard windows, no reader heads) are the plan of read_streams=1: they resume there,
    continuing with the same keys, and are refused, naming read_streams, with heads."""
    old = build_loader(cfg(tiny_build, read_streams=1))
    old.set_epoch(1)
    it = iter(old)
    next(it), next(it)
    state = {k: v for k, v in old.state_dict().items() if k != "read_streams"} | {"version": 2}
    rest = [k for b in old.plan_keys(1)[2:] for k in b]
    with pytest.raises(ValueError, match="read_streams is 1 in the state, 8 here"):
        build_loader(cfg(tiny_build)).load_state_dict(state)
    resumed = build_loader(cfg(tiny_build, read_streams=1))
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert [k for b in epoch_keys(resumed) for k in b] == rest


def test_too_few_samples_is_an_error(tiny_build):
    with pytest.raises(ValueError, match="fewer than world_size"):
        build_loader(cfg(tiny_build, batch_size=16), world_size=4)


def test_sqrt_resampling_on_real_labels(tiny_build):
    loader = build_loader(cfg(tiny_build, "wsp", resample="sqrt"))
    plan = [k for b in loader.plan_keys(0) for k in b]
    assert len(plan) == len(loader) * 4 == 56
    assert len(set(plan)) < len(plan)  # with replacement: repeats
    assert plan == [k for b in build_loader(cfg(tiny_build, "wsp", resample="sqrt")).plan_keys(0) for k in b]
    ys = [t for _, t in loader]
    assert len(ys) == 14 and all(t.sum(1).min() >= 1 for t in ys)  # every drawn sample is labeled


def test_backend_parity(tiny_build):
    """DALI (CPU) and Pillow-SIMD: identical keys and labels, pixels within a few grey levels."""
    for task in ("eval", "mae"):
        outs = {}
        for backend in ("webdataset", "dali"):
            loader = build_loader(cfg(tiny_build, task, backend=backend, drop_last=False, batch_size=8))
            xs, ys, keys = [], [], []
            for x, y in loader:
                xs.append(x), ys.append(y), keys.extend(loader.last_batch_keys)
            outs[backend] = torch.cat(xs), torch.cat(ys), keys
        (xa, ya, ka), (xb, yb, kb) = outs["webdataset"], outs["dali"]
        assert ka == kb and len(ka) == 60 and torch.equal(ya, yb)
        assert xa.device == xb.device and xa.shape == xb.shape and xa.dtype == xb.dtype
        diff = (xa - xb).abs() * 0.225 * 255  # back to grey levels
        assert diff.mean() < 1.0 and diff.max() < 12, (task, float(diff.mean()), float(diff.max()))


def corrupt_copy(build: Path, tmp_path: Path) -> tuple[Path, str, int]:
    """A copy of the build with one JPEG garbled in shard 1 and shard 3 cut in half."""
    out = tmp_path / "build"
    shutil.copytree(build, out)
    key, members = read_dali_index(out / "shards" / "shard-000001.idx")[5]
    off, size = members["jpg"]
    with open(out / "shards" / "shard-000001.tar", "r+b") as f:
        f.seek(off + 4)  # keep the SOI marker and the first segment marker, garble what follows
        f.write(b"\x00" * min(400, size - 6))
    tar = out / "shards" / "shard-000003.tar"
    samples = read_dali_index(tar.with_suffix(".idx"))
    cut = samples[6][1]["jpg"][0] + 10  # inside sample 6's JPEG: samples 6..11 are gone
    with open(tar, "r+b") as f:
        f.truncate(cut)
    return out, key, 6


@pytest.mark.parametrize("backend", ["webdataset", "dali"])
def test_bad_data_is_skipped_and_counted(tiny_build, tmp_path, backend):
    build, bad_key, lost = corrupt_copy(tiny_build, tmp_path)
    loader = build_loader(cfg(build, "eval", backend=backend, drop_last=False, batch_size=8))
    assert loader.num_samples == 60 - lost
    assert loader.skipped["truncated_shard"] == lost
    assert all(s["shard"] == "shard-000003.tar" for s in loader.skipped_samples)
    batches = epoch_keys(loader)
    assert [len(b) for b in batches] == [8] * 6 + [6]  # 54 samples, batch sizes exact
    keys = [k for b in batches for k in b]
    assert bad_key not in keys and len(set(keys)) == 53  # the bad one replaced by a batch-mate
    decode = [s for s in loader.skipped_samples if s["reason"] == "decode_error"]
    assert [(s["shard"], s["key"]) for s in decode] == [("shard-000001.tar", bad_key)]


@pytest.mark.gpu
def test_dali_mixed_decoding_on_gpu(tiny_build):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gpu = build_loader(cfg(tiny_build, "eval", backend="dali", dali_device="gpu", drop_last=False))
    cpu = build_loader(cfg(tiny_build, "eval", backend="webdataset", drop_last=False))
    for (xg, yg), (xc, yc) in zip(gpu, cpu, strict=True):
        assert xg.is_cuda and xg.dtype == torch.float32 and torch.equal(yg, yc)
        assert ((xg.cpu() - xc).abs() * 0.225 * 255).mean() < 2.0  # nvJPEG IDCT differs slightly


def test_eval_recipe_matches_torchvision_two_step(tiny_build):
    """One resize(box=...) == torchvision Resize(S/0.875) + CenterCrop(S) (what ImageFolder eval uses)."""
    import io

    from maws_data.loader import ShardFiles, read_sidecar
    from maws_data.transforms import batch_geometry, crop_resize, normalize_batch, torchvision_transform
    from PIL import Image

    index = open_index(str(tiny_build))
    side, files, tv = read_sidecar(index, 0), ShardFiles(index), torchvision_transform("eval", S)
    for gid in range(0, 16, 3):
        data = files.read(np.array([0]), side.jpg_offset[[gid]], side.jpg_size[[gid]])[0]
        im = Image.open(io.BytesIO(data))
        boxes, flips = batch_geometry(np.array([im.width]), np.array([im.height]), np.array([gid]), task="eval",
                                      image_size=S, seed=0, epoch=0)
        box, flip = tuple(boxes[0]), bool(flips[0])
        ours = normalize_batch(crop_resize(im, box, flip, S)[None])[0]
        ref = tv(Image.open(io.BytesIO(data)).convert("RGB"))
        assert not flip and ours.shape == ref.shape == (3, S, S)
        assert ((ours - ref).abs() * 0.225 * 255).mean() < 0.05  # measured < 0.001; a 2 px shift gives > 10


def test_sqrt_resampling_class_frequencies_match_the_exact_global_draw(tiny_build):
    """The loader's resampled epochs (per-shard multinomial + in-shard draws) against the previous loader's
    exact global draw (`rng.choice(pool, p=w)`, w = 1/sqrt(count of the rarest label), counts over the
    loaded samples): per-class frequencies agree within sampling error over 400 epochs (22,400 draws).

    The loader counts classes from vocabulary.tsv (the builder's text pass), the previous loader counted
    loaded samples; the two agree on this build (no row was skipped), and the test checks that they do,
    so that it compares the draw and not a change of weights."""
    loader = build_loader(cfg(tiny_build, "wsp", resample="sqrt"))
    truth = shard_json(tiny_build)
    pool = [j["labels"] for j in truth.values() if j["labels"]]
    loaded = np.bincount([c for lab in pool for c in lab], minlength=loader.num_classes)
    assert np.array_equal(loaded, loader.index.class_counts)
    epochs, source = 400, loader.source
    ours = np.zeros(loader.num_classes)
    for epoch in range(epochs):
        for b in range(len(loader)):
            ours += np.bincount(source.batch(epoch, b)[0].labels, minlength=loader.num_classes)
    w = np.array([1 / np.sqrt(loaded[lab].min()) for lab in pool])
    draws = epochs * len(loader) * 4
    rng = np.random.default_rng(0)
    exact = np.zeros(loader.num_classes)
    for i in rng.choice(len(pool), size=draws, p=w / w.sum()):
        exact[pool[i]] += 1
    p_class = np.array([sum(w[i] for i, lab in enumerate(pool) if c in lab) for c in range(loader.num_classes)]) / w.sum()
    sigma = np.sqrt(draws * p_class * (1 - p_class))
    assert np.all(np.abs(ours - exact) <= 4 * np.sqrt(2) * sigma + 1), np.max(np.abs(ours - exact) / (sigma + 1e-9))
    assert np.all(np.abs(ours - draws * p_class) <= 4 * sigma + 1)
    # it does up-weight: the 54 classes of 2 samples are drawn more often together than without resampling
    # (only a little here: almost every photo carries one of them; test_plan.py shows the flattening)
    rare = loaded == loaded.min()
    assert ours[rare].sum() / draws > 1.1 * loaded[rare].sum() / len(pool)
