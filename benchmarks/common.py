"""What every benchmark script shares: arguments, data, device description, timing and tables.

Timings on a GPU are only meaningful after the queued kernels have finished, so every timed
region starts and ends with :func:`synchronize`; each measurement is the best of a few repeats,
which on a shared machine is the figure least disturbed by other processes.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.core.data import DataPaths, DataSplit, load_dataset
from bench.core.device import resolve_device
from bench.core.errors import BenchError
from bench.nn.train import TrainRecipe
from bench.orchestration.config import GridConfig, read_yaml

REPO = Path(__file__).resolve().parent.parent


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="where CIFAR-10 is looked for (default: $BENCH_DATA_ROOT, else ./data)")
    parser.add_argument("--cache-dir", default=str(REPO / "results" / "cache"),
                        help="decoded-dataset cache (default: results/cache)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best one is reported")
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")


def load_cifar10(args: argparse.Namespace) -> DataSplit:
    return load_dataset("cifar10", DataPaths.resolve(args.data_root, args.cache_dir))


def device_from_args(args: argparse.Namespace) -> torch.device:
    return resolve_device(args.device)


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100 ...)`` or ``cpu (N threads)``: enough to compare rows across machines."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    threads = torch.get_num_threads()
    return f"{device.type} ({threads} thread{'s' if threads != 1 else ''})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(run: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """The shortest wall time of ``repeats`` calls of ``run`` (device work included)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A Markdown table of ``columns`` (missing values shown as ``-``)."""
    cells = [[format_value(row.get(c, "-")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) == "" for row in rows) for c in columns]
    for r in cells:
        print("| " + " | ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(r, widths, numeric, strict=True)) + " |")


def write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: Path) -> None:
    """Write exactly ``columns`` (in that order), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


RECIPE_CONFIGS = {"paper": REPO / "configs" / "cifar10_paper.yaml", "fast": REPO / "configs" / "fast_cifar_resnet18.yaml"}


def recipe_settings(name_or_path: str) -> tuple[TrainRecipe, float, int]:
    """(training recipe, holdout, evaluation batch size) of a named recipe or a grid YAML file.

    Only these three settings are read (not the whole grid), so a recipe can be measured while
    some of its grid's plugins are still missing.
    """
    path = RECIPE_CONFIGS.get(name_or_path, Path(name_or_path))
    raw = read_yaml(path)
    try:
        recipe = TrainRecipe(**(raw.get("train") or {}))
    except (TypeError, ValueError) as err:
        raise BenchError(f"{path}: train: {err}") from None
    defaults = GridConfig.model_fields
    holdout = float(raw.get("holdout", defaults["holdout"].default))
    return recipe, holdout, int(raw.get("eval_batch_size", defaults["eval_batch_size"].default))


def report(rows: Sequence[dict[str, Any]], columns: Sequence[str], csv_columns: Sequence[str],
           csv_path: Path | None, note: str = "") -> None:  # fmt: skip
    """Print the table (and a note on what is extrapolated); write the CSV when asked."""
    print()
    print_table(rows, columns)
    if note:
        print(f"\n{note}")
    if csv_path:
        write_csv(rows, csv_columns, csv_path)
        print(f"wrote {csv_path}")


def script_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any], argv: list[str] | None) -> int:
    """Parse, run; a user error prints one line and exits 2, as ``run_bench.py`` does."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
