"""The one place that knows about processes: run a function over a stream of tasks, locally or on Ray.

    with Runner(RunnerConfig(kind="local", processes=4)) as runner:
        for task, result in runner.map(fn, tasks, desc="text pass"):
            ...

`map` is unordered (results as they finish) and lazy: it pulls tasks from the iterable only to keep
at most `in_flight` of them running or queued (2 per worker), so neither the driver nor the
scheduler ever holds the whole task list (backpressure). Tasks are small records (which rows of which
file, where to write); workers read their own rows.

* local: `processes` == 1 runs the tasks inline; otherwise a process pool of forkserver workers
  (`_new_pool`), created once and reused by every stage: a fresh server process imports the
  build's modules once (polars, pyarrow, numpy: ~0.2 s of CPU from bytecode, ~0.6 s compiling them
  from source) and forks each worker from that, so starting a worker costs ~10 ms, not an import of
  its own. `warm()` starts the pool early; `start_early()` earlier still, before the caller's own
  imports (the `maws-data` command calls it before typer parses its options), for the next Runner
  to adopt: the server's imports then overlap the driver's. After
  `recycle_tasks` tasks per worker the pool is drained and replaced by a fresh one: a worker's
  memory then cannot creep with the number of shards it has written (freed objects leave
  fragmented arenas: +25 MB over a worker's first 500 shards, +90 MB over 5,000). Not a plain
  fork: the parent may hold torch/DALI/CUDA state or threads that a fork would copy
  half-initialised; the forkserver holds none of it.
* ray: one Ray task per task, `num_cpus=1` and 1 polars/OpenBLAS/OpenMP thread (`THREAD_VARS`);
  a task lost with its worker or node is retried by Ray (`retries`); a task that runs past
  `task_timeout_s` is cancelled and resubmitted, and after `retries` such attempts the build fails
  with the task's name (one stuck download cannot hang the end of the build). Every task is idempotent (same inputs -> same bytes, atomic writes), so a retry or
  a late duplicate is harmless.

Library threads: the CLI gives each local process cores // processes polars, OpenBLAS and OpenMP
threads (`limit_threads`, unless the variables are set): one worker per core, each with a pool of
one thread per core, only hands work between threads that wait for the same cores.

The local pool has the same deadline: a task past it stops the build with an error (a process pool
cannot cancel one task), and the rerun resumes.

Progress (optional): one tqdm bar per `map`, in input rows, with rows/s and images/s over the cluster.

Memory (driver): O(in_flight tasks).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal, Self


class TaskFailed(RuntimeError):
    """A task kept failing or kept running past its deadline (message names it)."""


@dataclass(frozen=True)
class RunnerConfig:
    kind: Literal["local", "ray"] = "local"
    processes: int = 1  # local workers; for a Ray cluster started here, its CPUs
    ray_address: str | None = None
    retries: int = 3  # Ray: attempts after a lost worker/node or a deadline
    task_timeout_s: float = 1800.0  # per task
    progress: bool = False
    recycle_tasks: int = 1000  # replace a worker after this many tasks (local: the pool; Ray: max_calls); 0 = never


class Runner:
    def __init__(self, cfg: RunnerConfig):
        self.cfg = cfg
        self._pool: ProcessPoolExecutor | None = None
        self._ray_started = False
        self._remotes: dict[Callable, Any] = {}
        self._warming: list = []  # the warm-up futures (kept so that they are not collected early)
        self._warm_modules: tuple[str, ...] = ()
        self._preloaded: tuple[str, ...] = ()  # what the current pool's workers were started importing
        self._submitted = 0  # tasks given to the current local pool

    def __enter__(self) -> Self:
        if self.cfg.kind == "ray":
            import ray

            if not ray.is_initialized():
                if self.cfg.ray_address:
                    ray.init(address=self.cfg.ray_address, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(num_cpus=self.cfg.processes, include_dashboard=False, log_to_driver=False)
                self._ray_started = True
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._ray_started:
            import ray

            ray.shutdown()

    @property
    def workers(self) -> int:
        if self.cfg.kind == "ray":
            import ray

            return max(1, int(ray.cluster_resources().get("CPU", 1)))
        return max(1, self.cfg.processes)

    def map(self, fn: Callable, tasks: Iterable, *, desc: str = "", total_rows: int | None = None
            ) -> Iterator[tuple[Any, Any]]:
        """(task, fn(task)) for every task, as they finish (module docstring)."""
        bar = _Progress(desc, total_rows, enabled=self.cfg.progress)
        try:
            if self.cfg.kind == "ray":
                gen = self._map_ray(fn, tasks)
            elif self.workers <= 1:
                gen = ((t, fn(t)) for t in tasks)
            else:
                gen = self._map_local(fn, tasks)
            for task, result in gen:
                bar.update(getattr(task, "rows", 0), result)
                yield task, result
        finally:
            bar.close()

    def warm(self, modules: tuple[str, ...] = ()) -> None:
        """Start the local pool now, each worker importing `modules` (no-op inline or on Ray)."""
        if self.cfg.kind != "local" or self.workers <= 1:
            return
        self._warm_modules = modules
        self._local_pool()
        if not set(modules) <= set(self._preloaded):  # an adopted early pool may import them already
            self._warming = [self._pool.submit(_import, modules) for _ in range(self.workers)]

    def renew(self) -> None:
        """Replace the local pool's workers by fresh ones (forked in ~10 ms each), releasing what a
        stage loaded into them: WordNet after the mapping round (~150 MB a worker) would otherwise
        stay through the image pass. No-op inline and on Ray (its workers are replaced after
        `recycle_tasks` calls)."""
        if self.cfg.kind == "local" and self._pool is not None:
            self._recycle()

    def _recycle_due(self) -> bool:
        return self.cfg.recycle_tasks > 0 and self._submitted >= self.workers * self.cfg.recycle_tasks

    def _recycle(self) -> None:
        """Replace the drained pool by a fresh one (same warm-up)."""
        self._pool.shutdown(wait=True)
        self._pool = None
        self._submitted = 0
        self.warm(self._warm_modules)

    def _local_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            early = _early.pop(self.workers, None)
            if early is not None:
                self._pool, self._preloaded, self._warming, starter = early
                starter.join()
            else:
                self._pool, self._preloaded = _new_pool(self.workers, self._warm_modules), ()
        return self._pool

    def _map_local(self, fn: Callable, tasks: Iterable) -> Iterator[tuple[Any, Any]]:
        self._local_pool()
        limit = 2 * self.workers
        it = iter(tasks)
        running: dict = {}
        exhausted = False
        while True:
            while not exhausted and len(running) < limit and not self._recycle_due():
                try:
                    t = next(it)
                except StopIteration:
                    exhausted = True
                    break
                running[self._local_pool().submit(fn, t)] = (t, time.monotonic())
                self._submitted += 1
            if not running:
                if exhausted:
                    return
                self._recycle()  # due, and every task given to this pool has finished
                continue
            done, _ = wait(running, timeout=min(10.0, self.cfg.task_timeout_s), return_when=FIRST_COMPLETED)
            for fut in done:
                t, _ = running.pop(fut)
                yield t, fut.result()
            if not done:
                self._check_deadlines_local(running)

    def _check_deadlines_local(self, running: dict) -> None:
        # A task's clock starts when it is submitted, and with at most 2 per worker in flight it waits
        # in the queue for at most one task ahead of it: past twice the deadline, it is stuck.
        now = time.monotonic()
        late = [t for t, started in running.values() if now - started > 2 * self.cfg.task_timeout_s]
        if late:
            for p in list(getattr(self._pool, "_processes", {}).values()):
                p.kill()  # a process pool cannot cancel one running task
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            raise TaskFailed(f"{describe(late[0])} did not finish within {self.cfg.task_timeout_s:.0f} s; "
                             "rerun the same command to resume (finished work is kept)")

    def _remote(self, fn: Callable):
        import ray

        if fn not in self._remotes:
            # retry_exceptions=False: a Python error in our code is a bug or a bad input, not flakiness
            # max_calls: Ray replaces a worker process after that many calls, as the local pool recycles
            # env_vars: a 1-CPU task gets 1 library thread (the driver's own setting, if it has one),
            # not one per core of its node (Ray merges these into the job's runtime_env env_vars)
            threads = {var: os.environ.get(var, "1") for var in THREAD_VARS}
            self._remotes[fn] = ray.remote(num_cpus=1, max_retries=self.cfg.retries,
                                           max_calls=self.cfg.recycle_tasks,
                                           runtime_env={"env_vars": threads})(fn)
        return self._remotes[fn]

    def _map_ray(self, fn: Callable, tasks: Iterable) -> Iterator[tuple[Any, Any]]:
        import ray

        remote = self._remote(fn)
        limit = 2 * self.workers
        it = iter(tasks)
        running: dict = {}  # ref -> (task, submitted at, attempt)
        exhausted = False
        while True:
            while not exhausted and len(running) < limit:
                try:
                    t = next(it)
                except StopIteration:
                    exhausted = True
                    break
                running[remote.remote(t)] = (t, time.monotonic(), 0)
            if not running:
                return
            done, _ = ray.wait(list(running), num_returns=1, timeout=min(5.0, self.cfg.task_timeout_s))
            for ref in done:
                t, _, _ = running.pop(ref)
                yield t, ray.get(ref)
            now = time.monotonic()
            for ref, (t, started, attempt) in list(running.items()):
                if now - started <= self.cfg.task_timeout_s:
                    continue
                ray.cancel(ref, force=True)
                del running[ref]
                if attempt >= self.cfg.retries:
                    raise TaskFailed(f"{describe(t)} ran past its deadline of {self.cfg.task_timeout_s:.0f} s "
                                     f"{attempt + 1} times; rerun the same command to resume")
                running[remote.remote(t)] = (t, time.monotonic(), attempt + 1)


# workers -> (pool, modules, warm-up futures, the thread submitting them): started by `start_early`,
# adopted by the next Runner
_early: dict[int, tuple[ProcessPoolExecutor, tuple[str, ...], list, threading.Thread]] = {}


def start_early(processes: int, modules: tuple[str, ...]) -> None:
    """Start a local pool of `processes` workers importing `modules`, now, for the next local Runner
    with that many processes to adopt (module docstring). Call it after setting any environment
    variable the workers need: they copy the environment when they start. A pool nobody adopts
    is shut down at exit, like any process pool."""
    if processes > 1 and processes not in _early:
        pool = _new_pool(processes, modules)
        warming: list = []
        # the first submit starts the workers, which waits for the forkserver to import `modules`:
        # from a thread, so that the caller's own imports run meanwhile
        starter = threading.Thread(target=lambda: warming.extend(pool.submit(_import, modules)
                                                                 for _ in range(processes)), daemon=True)
        starter.start()
        _early[processes] = (pool, modules, warming, starter)


# The libraries' own thread pools. polars (rayon) and OpenBLAS each start one thread per core in
# every process, so one worker per core means cores^2 threads; on the build's small tasks (25k-row
# text units, one shard's rows) their hand-offs cost more than the parallelism gives: with 2 workers
# on 2 cores the text pass ran 8-10% faster with one polars thread each (docs/data.md, "Stop 17").
# Ray sets OMP_NUM_THREADS for its workers the same way.
THREAD_VARS = ("POLARS_MAX_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def limit_threads(processes: int) -> dict[str, str]:
    """Give each process of a local build cores // processes library threads (at least 1), unless the
    user set the variable; returns what was set. It must run before polars is imported (polars sizes
    its pool then) and before the workers start (they inherit the environment): the CLI calls it first
    thing. The driver gets the same limit: while the workers run it only merges their results."""
    per = str(max(1, (os.cpu_count() or 1) // max(1, processes)))
    chosen = {var: per for var in THREAD_VARS if var not in os.environ}
    os.environ.update(chosen)
    return chosen


def local_processes(processes: int) -> int:
    """The local worker count for a `processes` setting: 0 means one per core."""
    return processes or os.cpu_count() or 1


def _new_pool(processes: int, modules: tuple[str, ...] = ()) -> ProcessPoolExecutor:
    """A pool of forkserver workers that start with this process's environment of now. The
    forkserver is a fresh interpreter (started once, on first use) that imports `modules` and then
    forks every worker of every pool: a worker starts in ~10 ms with the modules loaded, where a
    spawned one imports them itself (~1.3 s of CPU, on the cores the build needs). It holds no
    state of ours (no torch, DALI, CUDA or threads to copy half-initialised, which is why a plain
    fork is not used); and since it started earlier, each pool's workers get this process's
    environment when they start (a module that reads one when imported, like fsspec's FSSPEC_*
    config, sees the server's: set those before the first pool)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(modules))  # takes effect only until the server has started
    return ProcessPoolExecutor(max_workers=processes, mp_context=ctx, initializer=_adopt_environment,
                               initargs=(dict(os.environ),))


def _adopt_environment(env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)


def _import(modules: tuple[str, ...]) -> None:
    import importlib

    for m in modules:
        importlib.import_module(m)


def describe(task: Any) -> str:
    name = getattr(task, "name", None)
    return name() if callable(name) else type(task).__name__


class _Progress:
    """tqdm bar in input rows; the postfix says rows/s and images/s (over every worker of the cluster)."""

    def __init__(self, desc: str, total: int | None, *, enabled: bool):
        self.bar = None
        self.rows = self.images = 0
        self.t0 = time.monotonic()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="rows", desc=desc, file=sys.stderr, dynamic_ncols=True,
                            disable=bool(os.environ.get("MAWS_NO_PROGRESS")))

    def update(self, rows: int, result: Any) -> None:
        self.rows += rows
        if isinstance(result, dict):
            self.images += int(result.get("samples", 0) or 0)
        if self.bar is not None:
            self.bar.update(rows)
            dt = max(time.monotonic() - self.t0, 1e-9)
            self.bar.set_postfix(rows_per_s=f"{self.rows / dt:.0f}", images_per_s=f"{self.images / dt:.1f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
