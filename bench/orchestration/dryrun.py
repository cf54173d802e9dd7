"""``run --dry-run``: what a grid would do, without doing any of it.

Compiling the grid validates every name and parameter, and planning it against the run
directory and the artifact cache says which cells, models and defense fits are still missing.
The work estimate is counted in *image-passes* (epochs x images), the unit that does not depend
on the machine: multiply by a measured seconds-per-image (``benchmarks/training.py``,
``benchmarks/refine_fit.py``) or use ``benchmarks/grid_walltime.py estimate`` for wall time.
Nothing is trained, no dataset is loaded and no run directory is created.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from bench.core.records import RecordStore
from bench.core.registry import DEFENSES
from bench.orchestration.config import GridConfig, PluginSpec
from bench.orchestration.grid import Cell, compile_grid, instantiate
from bench.orchestration.plan import Plan, build_plan, cell_label
from bench.orchestration.rundir import check_run_dir
from bench.orchestration.store import ArtifactStore


def nominal_sizes(spec: PluginSpec) -> tuple[int, int] | None:
    """(train, test) sizes of a dataset entry when they are known without loading it."""
    params = spec.params
    if spec.name == "cifar10":
        sizes = (50_000, 10_000)
    elif spec.name == "mnist5k":
        train = int(params.get("train_size", 4000))
        sizes = (train, 5000 - train)
    else:
        return None
    train = min(sizes[0], params.get("train_subset") or sizes[0])
    test = min(sizes[1], params.get("test_subset") or sizes[1])
    return train, test


def fresh_plan(config: GridConfig) -> Plan:
    """Every job the grid needs when nothing is done or cached yet (for whole-grid estimates)."""
    with tempfile.TemporaryDirectory() as empty:
        return build_plan(compile_grid(config), RecordStore(Path(empty)), ArtifactStore(Path(empty)), config)


def _count(n: float | None) -> str:
    return "?" if n is None else f"{n:,.0f}"


def describe_plan(config: GridConfig, run_dir: Path, cache_dir: Path) -> str:
    """A human-readable listing of the grid's cells and the work that remains."""
    check_run_dir(run_dir)
    cells = compile_grid(config)
    plan = build_plan(cells, RecordStore(run_dir, repair=False), ArtifactStore(cache_dir), config)
    lines = [f"{len(cells)} cells in {config.name or 'the grid'} -> {run_dir}"]
    for cell in cells:
        state = "done" if cell.cell_id in plan.done_cells else "todo"
        lines.append(f"  [{state}] {cell.cell_id}  {cell_label(cell)}")
    lines.append("")
    lines.extend(work_summary(config, plan))
    return "\n".join(lines)


def work_summary(config: GridConfig, plan: Plan) -> list[str]:
    """Remaining jobs by kind, with their image-passes where the sizes are known."""
    jobs = list(plan)
    models = [j for j in jobs if j.kind in ("model", "clean")]
    fits = [j for j in jobs if j.kind == "defense"]
    evals = [j for j in jobs if j.kind == "cell"]
    epochs = config.train.epochs
    train_passes = _sum(_train_images(config, j.cell) for j in models)
    fit_passes = _sum(_fit_passes(config, j.cell) for j in fits)
    eval_images = _sum(_eval_images(config, j.cell) for j in evals)
    out = [
        f"remaining work ({len(plan.done_cells)} of {len(plan.cells)} cells already done):",
        f"  model trainings: {len(models)} x {epochs} epochs -> {_count(train_passes and train_passes * epochs)} "
        "image-passes",
    ]
    by_defense = Counter(j.cell.defense.name for j in fits)
    fits_text = ", ".join(f"{name} x{n}" for name, n in by_defense.items()) or "none"
    out.append(f"  defense fits: {len(fits)} ({fits_text}) -> {_count(fit_passes)} image-passes")
    out.append(f"  evaluations: {len(evals)} cells -> up to {_count(eval_images)} test images (clean + poisoned)")
    out.append("  (image-passes = epochs x images; wall time: benchmarks/grid_walltime.py estimate)")
    return out


def _sum(values) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else float(sum(values))


def _train_images(config: GridConfig, cell: Cell) -> float | None:
    sizes = nominal_sizes(cell.dataset)
    return None if sizes is None else sizes[0] * (1 - config.holdout)


def _fit_passes(config: GridConfig, cell: Cell) -> float | None:
    sizes = nominal_sizes(cell.dataset)
    defense = instantiate(DEFENSES, cell.defense)
    epochs = defense.fit_epochs()
    if sizes is None or epochs is None:
        return None
    fraction = defense.benign_fraction if defense.benign_fraction is not None else config.holdout
    return epochs * sizes[0] * fraction


def _eval_images(config: GridConfig, cell: Cell) -> float | None:
    sizes = nominal_sizes(cell.dataset)
    return None if sizes is None else 2 * sizes[1]
