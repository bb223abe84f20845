"""maws_data.runner: lazy, bounded submission; per-task deadlines (local pool and Ray); results as they finish."""

from __future__ import annotations

import os
import sys
import time

import pytest
from maws_data.runner import Runner, RunnerConfig, TaskFailed


def nap(seconds: float) -> dict:
    time.sleep(seconds)
    return {"samples": 1}


def test_local_runner_pulls_tasks_lazily():
    pulled = []

    def tasks():
        for i in range(12):
            pulled.append(i)
            yield 0.05

    seen = 0
    with Runner(RunnerConfig(kind="local", processes=2)) as runner:
        for _, result in runner.map(nap, tasks()):
            seen += 1
            assert result == {"samples": 1}
            assert len(pulled) - seen <= 2 * 2  # never more than 2 per worker in flight
    assert seen == 12


def test_local_deadline_stops_the_build_with_the_task_named():
    with Runner(RunnerConfig(kind="local", processes=2, task_timeout_s=0.5)) as runner:
        t0 = time.monotonic()
        with pytest.raises(TaskFailed, match="did not finish within"):
            list(runner.map(nap, [0.01, 60.0, 0.01]))
        assert time.monotonic() - t0 < 30


def test_ray_deadline_cancels_and_retries_then_fails():
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with Runner(RunnerConfig(kind="ray", task_timeout_s=120.0)) as runner:  # warm: a cold worker starts slowly
            assert [r for _, r in runner.map(nap, [0.01, 0.01])] == [{"samples": 1}] * 2
        with Runner(RunnerConfig(kind="ray", retries=1, task_timeout_s=2.0)) as runner:
            t0 = time.monotonic()
            with pytest.raises(TaskFailed, match="deadline of 2 s 2 times"):
                list(runner.map(nap, [60.0]))
            assert time.monotonic() - t0 < 30
    finally:
        ray.shutdown()


def pid(_: int) -> int:
    import os

    return os.getpid()


def test_local_pool_is_recycled_after_its_tasks():
    # 2 workers, a fresh pool every 3 tasks per worker: 20 tasks need 4 pools, every result arrives
    with Runner(RunnerConfig(kind="local", processes=2, recycle_tasks=3)) as runner:
        runner.warm(("json",))
        results = dict(runner.map(pid, range(20)))
    assert sorted(results) == list(range(20))
    assert len(set(results.values())) >= 4  # 4 pools, each with at least one worker of its own
    per_worker = {p: sum(1 for v in results.values() if v == p) for p in set(results.values())}
    assert max(per_worker.values()) <= 6  # no worker outlives its pool's 2 x 3 tasks


def env(name: str) -> tuple[int, str | None]:
    import os

    return os.getpid(), os.environ.get(name)


def test_a_pool_started_early_is_adopted_by_the_next_runner(monkeypatch):
    from maws_data import runner as runner_module
    from maws_data.runner import start_early

    monkeypatch.setenv("MAWS_TEST_EARLY", "set before start_early")
    start_early(2, ("json",))
    early_pool = runner_module._early[2][0]
    with Runner(RunnerConfig(kind="local", processes=2)) as runner:
        runner.warm(("json",))
        assert runner._pool is early_pool and 2 not in runner_module._early  # adopted, not a second pool
        results = list(runner.map(env, ["MAWS_TEST_EARLY"] * 6))
        early_pids = set(early_pool._processes)  # pid -> process, while the pool runs
    assert {v for _, (_, v) in results} == {"set before start_early"}  # the workers copied the environment
    assert len(early_pids) == 2 and {p for _, (p, _) in results} <= early_pids
    # a Runner of another size does not take it
    start_early(3, ("json",))
    with Runner(RunnerConfig(kind="local", processes=2)) as runner:
        runner.warm(("json",))
        assert 3 in runner_module._early and runner._pool is not runner_module._early[3][0]
    runner_module._early.pop(3)[0].shutdown(wait=True)


def test_each_pool_starts_with_the_environment_of_its_creation(monkeypatch):
    """The workers fork from one long-lived forkserver (started by the first pool of this process):
    a pool made after a variable changed must still see the new value, as a spawned pool would."""
    for value in ("first", "second"):
        monkeypatch.setenv("MAWS_TEST_POOL_ENV", value)
        with Runner(RunnerConfig(kind="local", processes=2)) as runner:
            results = list(runner.map(env, ["MAWS_TEST_POOL_ENV"] * 4))
        assert {v for _, (_, v) in results} == {value}
    monkeypatch.delenv("MAWS_TEST_POOL_ENV")
    with Runner(RunnerConfig(kind="local", processes=2)) as runner:
        assert {v for _, (_, v) in runner.map(env, ["MAWS_TEST_POOL_ENV"] * 2)} == {None}


def test_renew_replaces_the_workers():
    """After `renew`, tasks run in fresh processes (what the old ones loaded is gone); inline, a no-op."""
    with Runner(RunnerConfig(kind="local", processes=2)) as runner:
        before = {pid for _, (pid, _) in runner.map(env, ["HOME"] * 6)}
        runner.renew()
        after = {pid for _, (pid, _) in runner.map(env, ["HOME"] * 6)}
    assert before and after and not before & after
    with Runner(RunnerConfig(kind="local", processes=1)) as runner:
        runner.renew()
        assert {pid for _, (pid, _) in runner.map(env, ["HOME"])} == {__import__("os").getpid()}


def test_limit_threads_gives_each_process_its_share_of_the_cores_unless_set(monkeypatch):
    from maws_data import runner as runner_module
    from maws_data.runner import THREAD_VARS, limit_threads

    monkeypatch.setattr(runner_module.os, "cpu_count", lambda: 16)
    for var in THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stays
    assert limit_threads(4) == {"POLARS_MAX_THREADS": "4", "OPENBLAS_NUM_THREADS": "4"}
    assert os.environ["POLARS_MAX_THREADS"] == "4" and os.environ["OMP_NUM_THREADS"] == "3"
    monkeypatch.delenv("POLARS_MAX_THREADS")
    assert limit_threads(32) == {"POLARS_MAX_THREADS": "1"}  # more processes than cores: still 1 each


PROBE = '''
import os, sys
from maws_data.runner import Runner, RunnerConfig, limit_threads, start_early
import probe

if __name__ == "__main__":
    processes = int(sys.argv[1])
    limit_threads(processes)
    start_early(processes, ("polars",))  # as the CLI: the forkserver imports polars with the limit set
    import polars as pl
    with Runner(RunnerConfig(kind="local", processes=processes)) as runner:
        workers = sorted({n for _, n in runner.map(probe.pool_size, range(8))})
    print(pl.thread_pool_size(), workers)
'''


def test_workers_and_driver_start_polars_with_the_limit(tmp_path):
    """In a fresh interpreter (this one imported polars long ago), as the CLI does it: polars in the
    driver and in every forkserver worker sizes its pool from the limit, not from the core count."""
    import subprocess

    (tmp_path / "probe.py").write_text("def pool_size(_):\n    import polars\n    return polars.thread_pool_size()\n")
    (tmp_path / "main.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("POLARS_MAX_THREADS", "OPENBLAS_NUM_THREADS",
                                                            "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run([sys.executable, str(tmp_path / "main.py"), "2"], check=False, env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    share = max(1, (os.cpu_count() or 1) // 2)
    assert out.stdout.split("\n")[0] == f"{share} [{share}]"


def library_threads(_: int) -> tuple[str | None, int]:
    import polars

    return os.environ.get("POLARS_MAX_THREADS"), polars.thread_pool_size()


def test_ray_tasks_start_polars_with_one_thread(monkeypatch):
    """A 1-CPU Ray task's worker sizes polars' pool at 1, not at its node's cores; a value the driver
    set reaches the workers instead."""
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    for var in ("POLARS_MAX_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with Runner(RunnerConfig(kind="ray")) as runner:
            assert {r for _, r in runner.map(library_threads, range(3))} == {("1", 1)}
        monkeypatch.setenv("POLARS_MAX_THREADS", "2")
        with Runner(RunnerConfig(kind="ray")) as runner:  # a new Runner: a new remote function
            assert {r for _, r in runner.map(library_threads, range(3))} == {("2", 2)}
    finally:
        ray.shutdown()
