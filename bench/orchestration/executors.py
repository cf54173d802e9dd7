"""Where plan jobs run: in this process, in N worker processes, or (``bench.orchestration.ray_backend``) on Ray.

Every backend runs the same function, :func:`run_job`, inside a worker that keeps one
:class:`bench.orchestration.runner.CellRunner` for its whole life: datasets are decoded once per worker and
the most recent backdoored model stays in memory, so a worker that evaluates the cells of the
model it just trained never reloads it. A job that raises never takes the worker down: the
exception comes back as a failed :class:`JobResult` with its traceback. Every job runs under
the grid's compute settings (:func:`bench.core.determinism.compute_settings`: ``threads_per_job``
intra-op threads, ``deterministic`` kernels), so where it runs never changes its numbers.

Executors expose *slots* (one per worker). The scheduler (:mod:`bench.orchestration.scheduler`) starts a job
on a free slot and waits for results; it alone decides the order, so every backend behaves alike.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from bench.core.data import DataPaths
from bench.core.determinism import compute_settings, start_worker_process, worker_environment
from bench.core.illustrations import CellIllustrations
from bench.core.tsne_sample import CellFeatures
from bench.orchestration.config import GridConfig
from bench.orchestration.plan import Job


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its runner; picklable, paths absolute."""

    config: GridConfig
    paths: DataPaths
    device: str  # resolved inside the worker: "cpu", "cuda:1", ...
    plugin_modules: tuple[str, ...] = ()  # modules that registered the grid's plugins


@dataclass
class JobResult:
    """What a worker sends back: the cell record (with its t-SNE features and illustrations) for a
    cell job, or the failure.

    Workers never write into the run directory; the driver writes what comes back.
    """

    job_id: str
    ok: bool
    record: dict[str, Any] | None = None
    features: CellFeatures | None = None
    illustrations: CellIllustrations | None = None
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # built / loaded, in order
    error: str | None = None  # the exception's one-line summary
    traceback: str | None = None
    seconds: float = 0.0
    worker: str = ""


def error_line(err: BaseException) -> str:
    """``Type: first line of the message``: what ``status`` shows; the log keeps the rest."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def failure(job_id: str, error: str, tb: str | None = None, worker: str = "") -> JobResult:
    return JobResult(job_id, False, error=error, traceback=tb or error, worker=worker)


# ------------------------------------------------------------------------------ worker side

_RUNNER: tuple[WorkerSpec, Any] | None = None


def worker_runner(spec: WorkerSpec) -> Any:
    """This process's long-lived runner for ``spec`` (built on first use)."""
    global _RUNNER
    if _RUNNER is None or _RUNNER[0] != spec:
        import importlib

        import torch

        from bench.core.device import resolve_device
        from bench.orchestration.runner import CellRunner
        from bench.orchestration.store import ArtifactStore

        for module in spec.plugin_modules:
            importlib.import_module(module)
        device = resolve_device(spec.device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        _RUNNER = (spec, CellRunner(spec.config, spec.paths, ArtifactStore(spec.paths.cache_dir), device))
    return _RUNNER[1]


def worker_name(extra: str = "") -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}" + (f" ({extra})" if extra else "")


def run_job(spec: WorkerSpec, job: Job, runner: Any = None) -> JobResult:
    """Compute one job under the grid's compute settings (threads, deterministic kernels), which
    it restores afterwards; never raises (except KeyboardInterrupt): failures become results."""
    start = time.perf_counter()
    where = worker_name(spec.device)
    try:
        with compute_settings(spec.config.threads_per_job, spec.config.deterministic):
            runner = runner if runner is not None else worker_runner(spec)
            cell, artifacts = execute_job(runner, job)
    except Exception as err:
        return JobResult(job.job_id, False, error=error_line(err), traceback=traceback.format_exc(),
                         seconds=time.perf_counter() - start, worker=where)  # fmt: skip
    return JobResult(job.job_id, True, record=cell.record if cell else None, features=cell.features if cell else None,
                     illustrations=cell.illustrations if cell else None, artifacts=artifacts, seconds=time.perf_counter() - start, worker=where)  # fmt: skip


def execute_job(runner: Any, job: Job) -> tuple[Any, list[dict[str, Any]]]:
    """Produce the job's artifact (model, defense state), or the cell's record and features
    (a :class:`bench.orchestration.runner.CellResult`) for a cell job; with the artifacts the
    job built or loaded."""
    cell = job.cell
    runner.take_events()  # what an earlier, failed job left
    if job.kind == "cell":
        result = runner.run(cell)
        return result, result.record["artifacts"]
    data = runner.cell_data(cell)
    if job.kind == "clean":
        runner.clean_model(cell, data)
    else:
        attack = runner.fitted_attack(cell, data)
        model, _ = runner.backdoored_model(cell, data, attack)
        if job.kind == "defense":
            runner.defense(cell, data, model)
    return None, runner.take_events()


# ------------------------------------------------------------------------------ executors


class Executor(Protocol):
    slots: int

    def where(self, slot: int) -> str: ...

    def start(self, slot: int, job: Job) -> None: ...

    def wait(self) -> list[tuple[int, JobResult]]: ...

    def close(self) -> None: ...


class InlineExecutor:
    """One slot, in this process: no start-up cost, plugins registered at run time work, pdb works.
    The process's thread count and deterministic mode are the job's while it runs, then restored."""

    slots = 1

    def __init__(self, spec: WorkerSpec, runner: Any = None) -> None:
        self.spec = spec
        self.runner = runner
        self._job: Job | None = None

    def where(self, slot: int) -> str:
        return worker_name(self.spec.device)

    def start(self, slot: int, job: Job) -> None:
        self._job = job

    def wait(self) -> list[tuple[int, JobResult]]:
        assert self._job is not None
        job, self._job = self._job, None
        if self.runner is None:
            self.runner = worker_runner(self.spec)
        return [(0, run_job(self.spec, job, self.runner))]

    def close(self) -> None:
        self.runner = None


def _exit_with_parent(parent_pid: int) -> None:
    """A worker whose driver died (even by SIGKILL) stops within a second instead of running on."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _process_main(slot: int, spec: WorkerSpec, tasks: Any, results: Any, parent_pid: int, bar_lock: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    _exit_with_parent(parent_pid)
    from tqdm.auto import tqdm

    start_worker_process(spec.config.threads_per_job)

    tqdm.set_lock(bar_lock)
    while True:
        job = tasks.get()
        if job is None:
            return
        results.put((slot, run_job(spec, job)))


@contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class ProcessExecutor:
    """N long-lived worker processes on this machine, worker ``i`` pinned to ``specs[i].device``.

    Processes are spawned (not forked: CUDA and threaded BLAS do not survive a fork), with their
    thread pools sized to ``threads_per_job`` from the start (:func:`worker_environment`). Each
    worker's per-job progress bar gets its own terminal row below the grid bar. A worker that
    dies (out-of-memory kill, segfault) fails its job and is replaced.
    """

    def __init__(self, specs: list[WorkerSpec]) -> None:
        from tqdm.auto import tqdm

        self.specs = specs
        self.slots = len(specs)
        self._ctx = mp.get_context("spawn")
        self._results = self._ctx.Queue()
        self._bar_lock = self._ctx.RLock()
        tqdm.set_lock(self._bar_lock)
        self._procs: list[Any] = [None] * self.slots
        self._tasks: list[Any] = [None] * self.slots
        self._busy: dict[int, Job] = {}
        for slot in range(self.slots):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        self._tasks[slot] = self._ctx.Queue()
        proc = self._ctx.Process(
            target=_process_main, name=f"bench-worker-{slot}", daemon=True,
            args=(slot, self.specs[slot], self._tasks[slot], self._results, os.getpid(), self._bar_lock),
        )  # fmt: skip
        config = self.specs[slot].config
        # tqdm reads its defaults from TQDM_* at import; thread pools and cuBLAS size themselves at start.
        with _environ(TQDM_POSITION=str(slot + 1), **worker_environment(config.threads_per_job, config.deterministic)):
            proc.start()
        self._procs[slot] = proc

    def where(self, slot: int) -> str:
        return f"pid {self._procs[slot].pid} on {socket.gethostname()} ({self.specs[slot].device})"

    def start(self, slot: int, job: Job) -> None:
        self._busy[slot] = job
        self._tasks[slot].put(job)

    def wait(self) -> list[tuple[int, JobResult]]:
        while True:
            try:
                out = [self._results.get(timeout=1.0)]
            except queue.Empty:
                out = []
            while True:
                try:
                    out.append(self._results.get_nowait())
                except queue.Empty:
                    break
            for slot, _ in out:
                self._busy.pop(slot, None)
            for slot, job in list(self._busy.items()):
                proc = self._procs[slot]
                if not proc.is_alive():
                    del self._busy[slot]
                    msg = f"worker process {proc.pid} died (exit code {proc.exitcode}) while running {job.label}"
                    out.append((slot, failure(job.job_id, msg, worker=self.where(slot))))
                    self._spawn(slot)
            if out:
                return out

    def close(self) -> None:
        for slot, proc in enumerate(self._procs):
            if proc is None:
                continue
            if proc.is_alive() and slot not in self._busy:
                self._tasks[slot].put(None)
        deadline = time.monotonic() + 5
        for slot, proc in enumerate(self._procs):
            if proc is None:
                continue
            if slot in self._busy:
                proc.terminate()  # interrupted mid-job: its artifacts are written atomically, so nothing is lost
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()


# ------------------------------------------------------------------------------ helpers


def plugin_modules(config: GridConfig) -> tuple[str, ...]:
    """Modules that registered the grid's plugins, so a spawned worker can import them too."""
    from bench.core.registry import ATTACKS, DATASETS, DEFENSES, MODELS

    modules: list[str] = []
    for registry, specs in ((DATASETS, config.datasets), (MODELS, config.models),
                            (ATTACKS, config.attacks), (DEFENSES, config.defenses)):  # fmt: skip
        for spec in specs:
            module = getattr(registry.get(spec.name), "__module__", None)
            if module and module != "__main__" and module not in modules:
                modules.append(module)
    return tuple(modules)


def absolute_paths(paths: DataPaths) -> DataPaths:
    """Workers may run in another directory (Ray does): make the data and cache paths absolute."""
    return replace(paths, data_root=Path(paths.data_root).absolute(), cache_dir=Path(paths.cache_dir).absolute())
