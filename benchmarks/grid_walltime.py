"""Wall time of a whole grid: measured end to end, or estimated from measured throughput.

``measure`` runs ``run_bench.py run CONFIG`` (default: the default grid, configs/quick.yaml) in
a fresh run directory and a fresh artifact cache, so every model is trained and every defense
fitted, and prints the wall time with the per-cell split that the records hold. ``--data-cache``
reuses already-decoded datasets (the cache's ``data/`` folder) so that decoding JPEGs is not timed.

``estimate`` does the arithmetic for grids too big to run here (the paper's CIFAR-10 grid): the
number of trainings and defense fits the grid needs, times the seconds per epoch measured by
``benchmarks/training.py`` and ``benchmarks/refine_fit.py`` (their CSV files), times the epochs.
Defenses without a measured rate are listed, not guessed. The result is an estimate, and says so.

    python benchmarks/grid_walltime.py measure [CONFIG] [--csv FILE]
    python benchmarks/grid_walltime.py estimate configs/cifar10_paper.yaml --training-csv T.csv --refine-csv R.csv
    python benchmarks/grid_walltime.py estimate configs/cifar10_paper_fast.yaml   # rates in results/reference/
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.core.errors import BenchError
from bench.core.registry import DEFENSES
from bench.orchestration.config import load_config
from bench.orchestration.dryrun import fresh_plan
from benchmarks.common import REPO, report, script_main

MEASURE_COLUMNS = ["config", "cells", "wall_s", "model_s", "defense_s", "eval_s", "device"]
ESTIMATE_COLUMNS = ["component", "count", "unit_s", "total_s", "source"]
CIFAR10_EVAL = 10_000 + 9_000  # the clean test set and the poisoned one without target-class images
CIFAR10_SIDE = 32  # pixels: REFINE's default U-Net width depends on the image size


# --------------------------------------------------------------------------- measure


def fresh_cache(data_cache: Path | None) -> Path:
    """An empty artifact cache; with ``data_cache``, its decoded datasets are linked in."""
    cache = Path(tempfile.mkdtemp(prefix="grid-walltime-cache-"))
    if data_cache is not None:
        source = Path(data_cache).expanduser().resolve() / "data"
        if not source.is_dir():
            raise BenchError(f"--data-cache {data_cache} has no data/ folder of decoded datasets")
        (cache / "data").symlink_to(source, target_is_directory=True)
    return cache


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "records").glob("*.json"))]


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Seconds of the finished model-training and defense-fitting jobs (``jobs/*.json``), by kind."""
    totals: dict[str, float] = {}
    for path in (run_dir / "jobs").glob("*.json"):
        job = json.loads(path.read_text())
        if job.get("state") == "done" and job.get("kind") in ("model", "defense"):
            totals[job["kind"]] = totals.get(job["kind"], 0.0) + float(job.get("seconds", 0.0))
    return totals


def measure(args: argparse.Namespace) -> None:
    run_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="grid-walltime-run-"))
    cache = fresh_cache(args.data_cache)
    command = [sys.executable, str(REPO / "run_bench.py"), "run", str(args.config), "--out", str(run_dir),
               "--cache-dir", str(cache)]  # fmt: skip
    if args.data_root:
        command += ["--data-root", args.data_root]
    if args.device:
        command += ["--device", args.device]
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"the grid run failed with exit status {done.returncode}")
    records = read_records(run_dir)
    if not records:
        raise BenchError(f"the grid run wrote no records under {run_dir}")

    jobs = stage_seconds(run_dir)

    def total(stage: str) -> float:
        cell_sum = sum(float(r.get("seconds", {}).get(stage, 0.0)) for r in records)
        return round(jobs.get(stage, 0.0) + cell_sum, 1)

    row = {"config": Path(args.config).name, "cells": len(records), "wall_s": round(wall, 1), "model_s": total("model"),
           "defense_s": total("defense"), "eval_s": total("eval"), "device": records[0].get("device", "?")}  # fmt: skip
    note = ("wall_s: the whole command (start-up, data, every job, tables and figures); model_s and defense_s: "
            "training and fitting jobs plus what cells did themselves; eval_s: the cells' evaluation. "
            f"Run directory: {run_dir}")  # fmt: skip
    report([row], MEASURE_COLUMNS, MEASURE_COLUMNS, args.csv, note)


# --------------------------------------------------------------------------- estimate


def read_rows(path: Path | None) -> list[dict[str, str]]:
    if path is None:
        return []
    if not Path(path).is_file():
        raise BenchError(f"{path} does not exist (write it with the matching benchmark's --csv)")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def estimate(args: argparse.Namespace) -> None:
    config = load_config(Path(args.config))
    if args.training_csv is None:  # the measured rates kept with the reference runs
        from bench.orchestration.dryrun import walltime_lines

        print("\n".join(walltime_lines([("the whole grid", config, fresh_plan(config))], args.reference)))
        return
    # The jobs a fresh run would plan: the same counting as `run_bench.py run --dry-run`.
    jobs = list(fresh_plan(config))
    fits = [j.cell.defense for j in jobs if j.kind == "defense"]
    training = read_rows(args.training_csv)
    refine = read_rows(args.refine_csv)
    rows: list[dict[str, Any]] = []
    device = {r["device"] for r in training + refine}
    for index, spec in enumerate(config.models):
        model, recipe = spec.name, config.train_for(spec)  # each model trains with its own recipe
        trainings = sum(j.kind in ("model", "clean") and j.cell.order[1] == index for j in jobs)
        cells = sum(j.kind == "cell" and j.cell.order[1] == index for j in jobs)
        match = [r for r in training if r["model"] == model and int(r["batch_size"]) == recipe.batch_size]
        if not match:
            raise BenchError(f"{args.training_csv} has no row for model {model!r} at batch size {recipe.batch_size}")
        epoch_s, eval_rate = float(match[0]["epoch_est_s"]), float(match[0]["eval_img_per_s"])
        rows.append({"component": f"train {model} ({recipe.epochs} epochs)", "count": trainings,
                     "unit_s": epoch_s * recipe.epochs, "total_s": trainings * epoch_s * recipe.epochs,
                     "source": "training.csv: epoch_est_s x epochs"})  # fmt: skip
        rows.append({"component": f"evaluate {model}, undefended", "count": cells,
                     "unit_s": CIFAR10_EVAL / eval_rate, "total_s": cells * CIFAR10_EVAL / eval_rate,
                     "source": "training.csv: eval_img_per_s (defended prediction costs more)"})  # fmt: skip
    unmeasured = sorted({spec.name for spec in fits if spec.name != "refine" or not refine})
    default_width = DEFENSES.get("refine")().unet_width(CIFAR10_SIDE)
    refine_widths = Counter(int(s.params.get("width") or default_width) for s in fits if s.name == "refine" and refine)
    for width, count in sorted(refine_widths.items()):
        match = [r for r in refine if int(r["width"]) == width]
        if not match:
            raise BenchError(f"{args.refine_csv} has no row for REFINE width {width}")
        fit_s = float(match[0]["fit_est_s"])
        rows.append({"component": f"fit refine c={width}", "count": count, "unit_s": fit_s, "total_s": count * fit_s,
                     "source": "refine.csv: epoch_est_s x epochs"})  # fmt: skip
    total = sum(r["total_s"] for r in rows)
    rows.append({"component": "total (estimate)", "count": "", "unit_s": "", "total_s": total,
                 "source": f"= {total / 3600:.2f} h on {', '.join(sorted(device)) or '?'}"})  # fmt: skip
    note = "ESTIMATE from measured throughput x epochs, not a measured run."
    if unmeasured:
        note += f" Not included (no measured rate): fitting {', '.join(unmeasured)}."
    report(rows, ESTIMATE_COLUMNS, ESTIMATE_COLUMNS, args.csv, note)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    m = sub.add_parser("measure", help="run a grid from scratch and time it")
    m.add_argument("config", nargs="?", default=str(REPO / "configs" / "quick.yaml"), help="default: configs/quick.yaml")
    m.add_argument("--out", help="run directory (default: a new temporary one)")
    m.add_argument("--data-cache", type=Path, help="a cache dir whose decoded datasets (data/) to reuse")
    m.add_argument("--data-root", help="passed to run_bench.py")
    m.add_argument("--device", help="passed to run_bench.py (default: the config's)")
    m.add_argument("--csv", type=Path, help="also write the row to this CSV file")
    e = sub.add_parser("estimate", help="estimate a grid's wall time from the throughput benchmarks' CSVs")
    e.add_argument("config", help="grid YAML, e.g. configs/cifar10_paper.yaml")
    e.add_argument("--training-csv", type=Path,
                   help="written by benchmarks/training.py --csv (default: every benchmark CSV under --reference, "
                        "one estimate per measured device, as `run --dry-run` prints it)")
    e.add_argument("--reference", type=Path, default=REPO / "results" / "reference",
                   help="folder of measured throughput CSVs (default: results/reference)")
    e.add_argument("--refine-csv", type=Path, help="written by benchmarks/refine_fit.py --csv")
    e.add_argument("--csv", type=Path, help="also write the estimate to this CSV file")
    return parser


def run(args: argparse.Namespace) -> None:
    (measure if args.command == "measure" else estimate)(args)


def main(argv: list[str] | None = None) -> int:
    return script_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
