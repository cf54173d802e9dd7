"""Run a whole grid into a run directory: compile, plan, execute, then tables and figures.

The grid compiles into cells (:mod:`bench.orchestration.grid`), the cells into a plan of the jobs still
missing (:mod:`bench.orchestration.plan`), and the plan runs on a backend (:mod:`bench.orchestration.executors`,
:mod:`bench.orchestration.ray_backend`) under the scheduler (:mod:`bench.orchestration.scheduler`). Everything that can be
checked (config, plugin names and parameters, the data) is checked before the run directory is
touched; a job that fails at run time is recorded and the others go on.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import replace
from pathlib import Path

import torch

from bench.core.data import DataPaths, check_metadata
from bench.core.determinism import usable_cores
from bench.core.device import resolve_device
from bench.core.errors import BenchError
from bench.core.files import atomic_write_text
from bench.core.records import RecordStore
from bench.core.registry import DATASETS
from bench.orchestration.config import GridConfig
from bench.orchestration.executors import (
    Executor,
    InlineExecutor,
    ProcessExecutor,
    WorkerSpec,
    absolute_paths,
    plugin_modules,
)
from bench.orchestration.grid import Cell, compile_grid
from bench.orchestration.locks import RunLock
from bench.orchestration.placement import check_worker_options, place_workers
from bench.orchestration.plan import build_plan, check_distinct_cells
from bench.orchestration.rundir import check_run_dir, claim_run_dir, remove_run_temps
from bench.orchestration.runner import CellRunner
from bench.orchestration.scheduler import execute_plan
from bench.orchestration.status import JobBook
from bench.orchestration.store import ArtifactStore, check_cache_dir, sweep_cache
from bench.report.page import make_figures
from bench.report.tables import write_tables

BACKENDS = ("local", "ray")


def write_config_snapshot(config: GridConfig, run_dir: Path) -> None:
    import yaml

    atomic_write_text(yaml.safe_dump(config.resolved(), sort_keys=False), run_dir / "config.yaml")


def make_executor(
    backend: str,
    base: WorkerSpec,
    devices: tuple[str, ...],
    address: str | None,
    runner: CellRunner | None,
    *,
    workers: int | None = None,
    jobs_per_gpu: int | None = None,
) -> Executor:
    """One worker runs in this process (the data it already loaded is reused), several are spawned."""
    if backend == "ray":
        from bench.orchestration.ray_backend import RayExecutor

        return RayExecutor(base, address, workers, jobs_per_gpu)
    if len(devices) == 1:
        return InlineExecutor(replace(base, device=devices[0]), runner)
    return ProcessExecutor([replace(base, device=device) for device in devices])


def run_grid(
    config: GridConfig,
    run_dir: Path,
    paths: DataPaths,
    device: str | None = None,
    tsne: bool = False,
    *,
    workers: int | None = None,
    jobs_per_gpu: int | None = None,
    backend: str = "local",
    address: str | None = None,
) -> tuple[list[Cell], int, str]:
    """Compute every unfinished cell; return (cells, number computed now, Markdown table).

    A job that fails is recorded (``status``, ``logs/``) and never raised: a cell without a record
    after the call is a failed one.

    ``workers`` parallel workers or ``jobs_per_gpu`` of them per GPU (:func:`place_workers`;
    default on the CPU: usable cores / ``threads_per_job``, on CUDA: one per visible GPU); one
    worker runs in this process, more are spawned, never more than there are jobs.
    ``backend="ray"`` runs the jobs as Ray tasks (``address``: an existing cluster).
    At the end the run directory gets its tables, the figures its grid allows and report.html;
    ``tsne`` adds the t-SNE figures, drawn from the features the cells saved.
    """
    if backend not in BACKENDS:
        raise BenchError(f"unknown backend {backend!r}: use {' or '.join(BACKENDS)}")
    if address is not None and backend != "ray":
        raise BenchError("--address is for --backend ray")
    spec = str(device or config.device)
    check_worker_options(spec, workers, jobs_per_gpu, config.threads_per_job)
    check_cache_dir(paths.cache_dir)
    # Validates every name and parameter, and every plugin against the datasets' metadata.
    cells = compile_grid(config, paths.data_root)
    check_distinct_cells(cells)
    # Ray workers choose their own device.
    dev = resolve_device(spec) if backend == "local" else None
    devices: tuple[str, ...] = ()
    if dev is not None:
        gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
        devices = place_workers(spec, gpus, usable_cores(), workers, jobs_per_gpu, config.threads_per_job)
        if jobs_per_gpu is not None and not gpus:
            print(f"note: no GPU visible, --jobs-per-gpu ignored; {len(devices)} CPU workers", file=sys.stderr)
    run_dir = Path(run_dir)
    check_run_dir(run_dir)  # a file, or someone else's folder, is refused before any work
    paths = absolute_paths(paths)
    records = RecordStore(run_dir)
    runner = None
    if any(not records.has(c.cell_id) for c in cells):
        # Fail on missing data before creating the run dir; this also fills the decoded-data cache
        # that the workers read.
        runner = CellRunner(config, paths, ArtifactStore(paths.cache_dir), dev or torch.device("cpu"))
        for dataset in {c.dataset.model_dump_json(exclude={"label"}): c.dataset for c in cells}.values():
            meta = DATASETS.create(dataset.name, dataset.params).metadata(paths.data_root)
            check_metadata(meta, runner.dataset(dataset))
    base = WorkerSpec(config, paths, str(dev) if dev else spec, plugin_modules(config))
    claim_run_dir(run_dir)
    with RunLock(run_dir):
        remove_run_temps(run_dir)  # debris of a killed writer; the run lock says no one else writes here
        sweep_cache(paths.cache_dir)  # the same in the cache, where only temporaries without a live writer go
        write_config_snapshot(config, run_dir)
        plan = build_plan(cells, records, ArtifactStore(paths.cache_dir))
        book = JobBook(run_dir, uuid.uuid4().hex[:12])
        outcome = None
        if plan.jobs:
            executor = make_executor(backend, base, devices[: len(plan.jobs)], address, runner,
                                     workers=workers, jobs_per_gpu=jobs_per_gpu)  # fmt: skip
            runner = None  # spawned workers load their own data
            book.begin(plan, backend=backend, workers=executor.slots)
            try:
                outcome = execute_plan(plan, executor, book, records)
            finally:
                executor.close()
                book.end("finished" if outcome is not None else "interrupted")
        else:
            book.begin(plan, backend=backend, workers=0)
            book.end("finished")
    ids = {c.cell_id for c in cells}
    computed = outcome.records_written if outcome else 0
    markdown = write_tables(run_dir, ids)
    # Embedding is the slow part of a t-SNE figure: draw only the figures that are missing (a run
    # killed while drawing them), incomplete or older than their cells, so that re-running a
    # finished grid stays a matter of seconds.
    make_figures(run_dir, only=ids, tsne=tsne, strict=False, redraw=False)
    return cells, computed, markdown
