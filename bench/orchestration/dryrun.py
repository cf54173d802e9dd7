"""``run --dry-run``: what a grid would do, without doing any of it.

Compiling the grid validates every name and parameter, and planning it against the run
directory and the artifact cache says which cells, models and defense fits are still missing.
The work estimate is counted in *image-passes* (epochs x images), the unit that does not depend
on the machine. Where ``results/reference/`` holds measured throughput (the CSV files of
``benchmarks/training.py`` and ``benchmarks/refine_fit.py``), the listing adds the expected wall
time on each measured device (:mod:`bench.orchestration.walltime`) -- of the slice, and of the
whole grid when the run is a slice (``--only``); without measurements it says so and gives the
image-passes only. Nothing is trained, no dataset is loaded and no run directory is created.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from bench.core.data import DatasetMeta, resolve_data_root
from bench.core.records import RecordStore
from bench.core.registry import DATASETS, DEFENSES
from bench.orchestration.config import GridConfig
from bench.orchestration.grid import Cell, compile_grid
from bench.orchestration.plan import Plan, build_plan, cell_label
from bench.orchestration.rundir import check_run_dir
from bench.orchestration.store import ArtifactStore, check_cache_dir
from bench.orchestration.walltime import REFERENCE_DIR, Work, describe, estimate, read_rates, refine_width

Sizes = dict[str, tuple[int, int] | None]  # dataset entry (JSON) -> (train, test) images, if known


def _dataset_key(cell: Cell) -> str:
    return cell.dataset.model_dump_json(exclude={"label"})


def nominal_metas(cells: list[Cell], data_root: str | Path | None = None) -> dict[str, DatasetMeta]:
    """Each dataset entry's metadata (sizes, classes, image side), without loading it."""
    out: dict[str, DatasetMeta] = {}
    for cell in cells:
        if _dataset_key(cell) not in out:
            dataset = DATASETS.create(cell.dataset.name, cell.dataset.params)
            out[_dataset_key(cell)] = dataset.metadata(resolve_data_root(data_root))
    return out


def nominal_sizes(cells: list[Cell], data_root: str | Path | None = None) -> Sizes:
    """(train, test) sizes of each dataset entry of the cells, from its metadata (no loading)."""
    out: Sizes = {}
    for key, meta in nominal_metas(cells, data_root).items():
        known = meta.train_size is not None and meta.test_size is not None
        out[key] = (meta.train_size, meta.test_size) if known else None  # type: ignore[assignment]
    return out


def fresh_plan(config: GridConfig, data_root: str | Path | None = None) -> Plan:
    """Every job the grid needs when nothing is done or cached yet (for whole-grid estimates)."""
    with tempfile.TemporaryDirectory() as empty:
        return build_plan(compile_grid(config, data_root), RecordStore(Path(empty)), ArtifactStore(Path(empty)))


def _count(n: float | None) -> str:
    return "?" if n is None else f"{n:,.0f}"


def describe_plan(
    config: GridConfig,
    run_dir: Path,
    cache_dir: Path,
    data_root: str | Path | None = None,
    whole: GridConfig | None = None,
    reference_dir: Path = REFERENCE_DIR,
) -> str:
    """A human-readable listing of the grid's cells, the work that remains and its expected wall
    time; ``whole``: the grid ``config`` is a slice of, estimated too (from scratch)."""
    check_run_dir(run_dir)
    check_cache_dir(cache_dir)
    cells = compile_grid(config, data_root)
    plan = build_plan(cells, RecordStore(run_dir, repair=False), ArtifactStore(cache_dir))
    lines = [f"{len(cells)} cells in {config.name or 'the grid'} -> {run_dir}"]
    for cell in cells:
        state = "done" if cell.cell_id in plan.done_cells else "todo"
        lines.append(f"  [{state}] {cell.cell_id}  {cell_label(cell)}")
    lines.append("")
    lines.extend(work_summary(config, plan, data_root))
    plans = [("remaining work" if whole is None else "this slice", config, plan)]
    if whole is not None:
        plans.append(("the whole grid, from scratch", whole, fresh_plan(whole, data_root)))
    lines.extend(walltime_lines(plans, reference_dir, data_root))
    return "\n".join(lines)


def work_items(config: GridConfig, plan: Plan, data_root: str | Path | None = None) -> Work:
    """The plan's jobs in the units measured rates are in: image-passes and test images."""
    metas = nominal_metas(plan.cells, data_root)
    sizes = nominal_sizes(plan.cells, data_root)
    trainings, fits, evaluations = [], [], []
    for job in plan:
        cell, meta = job.cell, metas[_dataset_key(job.cell)]
        if job.kind in ("model", "clean"):
            passes = _train_passes(config, cell, sizes)  # the model's own recipe: its epochs and batch size
            trainings.append((cell.model.name, config.train_for(cell.model).batch_size,
                              passes if passes is not None else float("nan")))  # fmt: skip
        elif job.kind == "defense":
            width = refine_width(cell.defense.params, meta.height) if cell.defense.name == "refine" else None
            fits.append((cell.defense.name, width, _fit_passes(config, cell, sizes)))
        elif job.kind == "cell" and meta.test_size is not None:
            # the clean test set, and the poisoned one without the target class (balanced classes)
            evaluations.append((cell.model.name, meta.test_size * (2 - 1 / meta.num_classes)))
    return Work(trainings, fits, evaluations)


def walltime_lines(plans: list[tuple[str, GridConfig, Plan]], reference_dir: Path,
                   data_root: str | Path | None = None) -> list[str]:  # fmt: skip
    """The expected wall time of each plan on every device with measured throughput, or why none."""
    rates = read_rates(reference_dir)
    if not rates:
        return [f"  wall time: not estimated -- no measured throughput in {reference_dir}/ for any device "
                "(CSV files of benchmarks/training.py and benchmarks/refine_fit.py --csv); image-passes only"]  # fmt: skip
    out = [f"  wall time, ESTIMATE from the throughput measured in {reference_dir}/ (a serial sum of jobs; "
           "devices without measurements get none):"]  # fmt: skip
    for label, config, plan in plans:
        work = work_items(config, plan, data_root)
        out.extend(describe(label, estimate(work, device)) for device in rates.values())
    return out


def work_summary(config: GridConfig, plan: Plan, data_root: str | Path | None = None) -> list[str]:
    """Remaining jobs by kind, with their image-passes where the sizes are known."""
    jobs = list(plan)
    models = [j for j in jobs if j.kind in ("model", "clean")]
    fits = [j for j in jobs if j.kind == "defense"]
    evals = [j for j in jobs if j.kind == "cell"]
    # Each model trains with its own recipe (the grid's ``train`` under the entry's overrides).
    epoch_counts = sorted({config.train_for(j.cell.model).epochs for j in models} or {config.train.epochs})
    epochs = "/".join(str(e) for e in epoch_counts)
    sizes = nominal_sizes(plan.cells, data_root)
    train_passes = _sum(_train_passes(config, j.cell, sizes) for j in models)
    fit_passes = _sum(_fit_passes(config, j.cell, sizes) for j in fits)
    eval_images = _sum(_eval_images(j.cell, sizes) for j in evals)
    out = [
        f"remaining work ({len(plan.done_cells)} of {len(plan.cells)} cells already done):",
        f"  model trainings: {len(models)} x {epochs} epochs -> {_count(train_passes)} "
        "image-passes",
    ]
    by_defense = Counter(j.cell.defense.name for j in fits)
    fits_text = ", ".join(f"{name} x{n}" for name, n in by_defense.items()) or "none"
    out.append(f"  defense fits: {len(fits)} ({fits_text}) -> {_count(fit_passes)} image-passes")
    out.append(f"  evaluations: {len(evals)} cells -> up to {_count(eval_images)} test images (clean + poisoned)")
    out.append("  (image-passes = epochs x images; wall time from measured throughput below)")
    return out


def _sum(values) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else float(sum(values))


def _sizes(cell: Cell, sizes: Sizes) -> tuple[int, int] | None:
    return sizes[cell.dataset.model_dump_json(exclude={"label"})]


def _train_passes(config: GridConfig, cell: Cell, sizes: Sizes) -> float | None:
    """Epochs x attacker images of the cell's model training."""
    known = _sizes(cell, sizes)
    return None if known is None else known[0] * (1 - config.holdout) * config.train_for(cell.model).epochs


def _fit_passes(config: GridConfig, cell: Cell, sizes: Sizes) -> float | None:
    known = _sizes(cell, sizes)
    defense = DEFENSES.create(cell.defense.name, cell.defense.params)
    epochs = defense.fit_epochs()
    if known is None or epochs is None:
        return None
    fraction = defense.benign_fraction if defense.benign_fraction is not None else config.holdout
    return epochs * known[0] * fraction


def _eval_images(cell: Cell, sizes: Sizes) -> float | None:
    known = _sizes(cell, sizes)
    return None if known is None else 2 * known[1]
