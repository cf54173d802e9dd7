"""Expected wall time of a grid's jobs from measured throughput, never from guesses.

The measured rates are the CSV files that ``benchmarks/training.py --csv`` (training and
evaluation images/s per model and batch size) and ``benchmarks/refine_fit.py --csv`` (REFINE fit
images/s per U-Net width) write, kept under ``results/reference/`` with the GPU runs (see its
README). A file is recognised by its columns, and its rows are grouped by their ``device``
column. The estimate is the work :mod:`bench.orchestration.dryrun` counts -- image-passes of
every training and fit, test images of every evaluation -- divided by those rates: a serial sum
of jobs, labelled an estimate. Work without a measured rate (a defense other than REFINE, a
model or batch size not benchmarked) is named as missing, not guessed.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.core.errors import BenchError
from bench.core.registry import DEFENSES

REFERENCE_DIR = Path("results") / "reference"
TRAINING_COLUMNS = {"model", "batch_size", "train_img_per_s", "eval_img_per_s", "device"}
REFINE_COLUMNS = {"defense", "width", "fit_img_per_s", "device"}


@dataclass
class DeviceRates:
    """The measured rows of one device (the benchmarks' ``device`` column, e.g. ``cuda:0 (NVIDIA H200)``)."""

    device: str
    training: list[dict[str, str]] = field(default_factory=list)
    refine: list[dict[str, str]] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)


def read_rates(reference_dir: Path = REFERENCE_DIR) -> dict[str, DeviceRates]:
    """device -> its measured rates, from every benchmark CSV below ``reference_dir`` (none: {})."""
    rates: dict[str, DeviceRates] = {}
    for path in sorted(Path(reference_dir).rglob("*.csv")) if Path(reference_dir).is_dir() else []:
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise BenchError(f"cannot read the throughput file {path}: {err}") from None
        columns = set(rows[0]) if rows else set()
        kind = "training" if TRAINING_COLUMNS <= columns else "refine" if REFINE_COLUMNS <= columns else None
        for row in rows if kind else []:
            entry = rates.setdefault(row["device"], DeviceRates(row["device"]))
            getattr(entry, kind).append(row)
            entry.sources.add(str(path))
    return rates


def _rate(row: dict[str, str], column: str, path_hint: str) -> float:
    try:
        value = float(row[column])
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0:
        raise BenchError(f"throughput file row {row} ({path_hint}): {column} must be a positive number")
    return value


@dataclass
class Estimate:
    """Seconds per kind of work on one device, and the work that had no measured rate."""

    device: str
    seconds: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


@dataclass
class Work:
    """The jobs of a plan in the units the rates are in (see :func:`bench.orchestration.dryrun.work_items`)."""

    trainings: list[tuple[str, int, float]]  # (model, batch size, image-passes)
    fits: list[tuple[str, int | None, float | None]]  # (defense, REFINE width or None, image-passes)
    evaluations: list[tuple[str, float]]  # (model, test images)


def estimate(work: Work, rates: DeviceRates) -> Estimate:
    """The serial wall time of ``work`` at ``rates``."""
    where = ", ".join(sorted(rates.sources))
    out = Estimate(rates.device)
    missing: Counter[str] = Counter()

    def add(kind: str, seconds: float) -> None:
        out.seconds[kind] = out.seconds.get(kind, 0.0) + seconds

    for model, batch, passes in work.trainings:
        row = next((r for r in rates.training if r["model"] == model and int(r["batch_size"]) == batch), None)
        if row is None:
            missing[f"training {model} at batch {batch}"] += 1
        else:
            add("training", passes / _rate(row, "train_img_per_s", where))
    for model, images in work.evaluations:
        row = next((r for r in rates.training if r["model"] == model), None)
        if row is None:
            missing[f"evaluating {model}"] += 1
        else:
            add("evaluation", images / _rate(row, "eval_img_per_s", where))
    for defense, width, passes in work.fits:
        row = next((r for r in rates.refine if r["defense"] == defense and int(r["width"]) == width), None)
        if row is None or passes is None:
            missing[f"fitting {defense}" + (f" c={width}" if width else "")] += 1
        else:
            add(f"{defense} fits", passes / _rate(row, "fit_img_per_s", where))
    out.missing = [f"{what} x{n}" for what, n in missing.items()]
    return out


def refine_width(params: dict, side: int | None) -> int | None:
    """The U-Net width a REFINE entry resolves to on images of ``side`` pixels."""
    defense = DEFENSES.create("refine", params)
    if defense.params.width is not None:
        return int(defense.params.width)
    return None if side is None else int(defense.unet_width(side))


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def describe(label: str, est: Estimate) -> str:
    """One line: total and split, and what it leaves out."""
    split = " + ".join(f"{kind} {format_duration(s)}" for kind, s in est.seconds.items()) or "nothing measured applies"
    line = f"  {label} on {est.device}: {format_duration(est.total)} ({split})"
    if est.missing:
        line += f"; not included (no measured rate): {', '.join(est.missing)}"
    return line
