"""Aggregate throughput of concurrent REFINE fits and model trainings sharing one device.

For each job kind (``refine``: a REFINE fit; ``train``: a classifier trained by
``train_classifier``) and each process count in ``--procs`` (default 1 2 4), that many separate
processes are spawned. Each loads the same training images, warms up with a one-step run (CUDA
context, cuDNN's kernel search, allocators), waits at a barrier so that all start together, then
runs ``1 + --steps`` steps of the job, timing the steps after the first (``StepMeter`` in
``benchmarks/common.py``; no FLOP counting). The table has one row per process (its images and
its own timed window) and an ``all`` row per process count: the images of all processes over
the union of their windows (first start to last end), i.e. the aggregate images/s, and its
``scaling`` against one process alone.

    python benchmarks/concurrency.py [--jobs refine train] [--procs 1 2 4] [--steps 20] [--csv FILE]

On a CPU the processes share the cores: each gets ``usable cores / procs`` threads unless ``--threads``
says otherwise. Tiny sizes for a smoke test: ``--images 64 --batch-size 4 --width 4 --model small_cnn``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.core.data import ImageSet
from bench.core.determinism import usable_cores
from bench.core.device import resolve_device
from bench.core.errors import BenchError
from bench.core.registry import DEFENSES, MODELS
from benchmarks.common import (
    StepMeter,
    add_common_args,
    describe_device,
    device_from_args,
    load_cifar10,
    random_subset,
    recipe_settings,
    report,
    script_main,
    seeded_model,
    synchronize,
)
from benchmarks.refine_fit import refine_fit_runner
from benchmarks.training import training_runner

JOBS = ("refine", "train")
CSV_COLUMNS = ["job", "procs", "process", "threads", "steps", "batch_size", "images", "seconds", "img_per_s", "scaling",
               "device"]  # fmt: skip
START_TIMEOUT_S = 1800  # loading data and warming up, per process, before the common start
POLL_S = 2.0


@dataclass(frozen=True)
class JobSpec:
    """What one worker process runs; plain values, so that it pickles into a spawned process."""

    job: str
    device: str
    data_file: str
    steps: int
    batch_size: int | None
    width: int | None
    model: str
    recipe: str
    threads: int | None


def build_job(spec: JobSpec, train: ImageSet, device: torch.device) -> tuple[Any, int]:
    """(``run(k)`` doing ``k`` steps of the job, images per step)."""
    if spec.job == "refine":
        batch = spec.batch_size or DEFENSES.get("refine")().params.batch_size
        model = seeded_model(spec.model, train).to(device).eval()
        return refine_fit_runner(spec.width, batch, model, train, device), batch
    recipe = recipe_settings(spec.recipe)[0]
    if spec.batch_size:
        recipe = replace(recipe, batch_size=spec.batch_size)
    model = seeded_model(spec.model, train)
    return training_runner(model, train, recipe, device, desc=f"train {spec.model}"), recipe.batch_size


def worker(spec: JobSpec, index: int, barrier: Any, results: Any) -> None:
    """One process: load, warm up, wait for the others, run and time; report through ``results``."""
    try:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        device = resolve_device(spec.device)
        payload = torch.load(spec.data_file, weights_only=True)
        train = ImageSet(payload["x"], payload["y"], list(payload["classes"]))
        run, batch = build_job(spec, train, device)
        run(1)
        synchronize(device)
        barrier.wait(timeout=START_TIMEOUT_S)
        with StepMeter(device, spec.steps, count_flops=False) as meter:
            run(1 + spec.steps)
        results.put({"process": index, "images": spec.steps * batch, "batch_size": batch,
                     "start": meter.start, "end": meter.end})  # fmt: skip
    except BaseException as err:  # noqa: BLE001 -- reported to the parent, which fails the run
        barrier.abort()
        results.put({"process": index, "error": f"{type(err).__name__}: {err}"})


def collect(workers: list[Any], results: Any) -> list[dict[str, Any]]:
    """One result per worker; a worker that died without reporting is an error, not a hang."""
    got: list[dict[str, Any]] = []
    while len(got) < len(workers):
        try:
            got.append(results.get(timeout=POLL_S))
        except queue.Empty:
            if not any(w.is_alive() for w in workers):
                try:
                    got.append(results.get(timeout=POLL_S))
                except queue.Empty:
                    raise BenchError(f"{len(workers) - len(got)} worker process(es) exited without a result") from None
    for w in workers:
        w.join()
    errors = sorted(r["error"] for r in got if "error" in r)
    if errors:
        raise BenchError(f"a worker failed: {errors[0]}")
    return sorted(got, key=lambda r: r["process"])


def run_concurrently(spec: JobSpec, procs: int) -> list[dict[str, Any]]:
    """Spawn ``procs`` workers of ``spec`` that start together; their results, by process."""
    ctx = mp.get_context("spawn")  # CUDA cannot be forked; spawn is the same on every platform
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    workers = [ctx.Process(target=worker, args=(spec, i, barrier, results), daemon=True) for i in range(procs)]
    for w in workers:
        w.start()
    try:
        return collect(workers, results)
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
                w.join()


def rows_for(spec: JobSpec, procs: int, results: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """One row per process and an ``all`` row: summed images over the union of the timed windows."""
    common = {"job": spec.job, "procs": procs, "threads": spec.threads or "default", "steps": spec.steps,
              "batch_size": results[0]["batch_size"], "scaling": "", "device": device}  # fmt: skip
    rows = []
    for r in results:
        seconds = r["end"] - r["start"]
        rows.append({**common, "process": r["process"], "images": r["images"], "seconds": round(seconds, 4),
                     "img_per_s": round(r["images"] / seconds, 1)})  # fmt: skip
    images = sum(r["images"] for r in results)
    window = max(r["end"] for r in results) - min(r["start"] for r in results)
    rows.append({**common, "process": "all", "images": images, "seconds": round(window, 4),
                 "img_per_s": round(images / window, 1)})  # fmt: skip
    return rows


def add_scaling(rows: list[dict[str, Any]]) -> None:
    """Aggregate images/s over that of one process alone, where one process was measured."""
    alone = {r["job"]: r["img_per_s"] for r in rows if r["process"] == "all" and r["procs"] == 1}
    for r in rows:
        if r["process"] == "all" and r["job"] in alone:
            r["scaling"] = round(r["img_per_s"] / alone[r["job"]], 2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS, help="job kinds (default: both)")
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2, 4], help="process counts (default 1 2 4)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per process, after one untimed (default 20)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: REFINE's 256; the recipe's for train")
    parser.add_argument("--width", type=int, default=None, help="REFINE's U-Net width c (default: the paper's, 64)")
    parser.add_argument("--model", default="cifar_resnet18", help="frozen model (refine) / trained model (train)")
    parser.add_argument("--recipe", default="paper", help="training recipe for train: paper, fast or a grid YAML")
    parser.add_argument("--images", type=int, default=None, help="training images each process loads (default all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: on a CPU, cores / procs)")
    add_common_args(parser)
    return parser


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    MODELS.get(args.model)
    recipe_settings(args.recipe)
    if args.steps < 1 or any(p < 1 for p in args.procs) or (args.threads is not None and args.threads < 1):
        raise BenchError("--steps, --procs and --threads must be >= 1")
    device = device_from_args(args)
    train = load_cifar10(args).train
    train = random_subset(train, args.images)
    where = describe_device(device)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as tmp:
        data_file = str(Path(tmp) / "train.pt")
        torch.save({"x": train.x, "y": train.y, "classes": train.classes}, data_file)
        for job in args.jobs:
            for procs in args.procs:
                threads = args.threads or (max(1, usable_cores() // procs) if device.type == "cpu" else None)
                spec = JobSpec(job, str(device), data_file, args.steps, args.batch_size, args.width, args.model,
                               args.recipe, threads)  # fmt: skip
                new = rows_for(spec, procs, run_concurrently(spec, procs), where)
                rows += new
                print(f"  {job} x{procs}: {new[-1]['img_per_s']:,.1f} img/s together", flush=True)
    add_scaling(rows)
    note = ("img_per_s: a process's images over its own timed window; on the 'all' rows, every process's images over "
            "the first start to the last end. scaling: the 'all' rate over one process alone.")  # fmt: skip
    report(rows, CSV_COLUMNS, CSV_COLUMNS, args.csv, note)
    return rows


def main(argv: list[str] | None = None) -> int:
    return script_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
