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

from bench.core.data import resolve_data_root
from bench.core.records import RecordStore
from bench.core.registry import DATASETS, DEFENSES
from bench.orchestration.config import GridConfig
from bench.orchestration.grid import Cell, compile_grid
from bench.orchestration.plan import Plan, build_plan, cell_label
from bench.orchestration.rundir import check_run_dir
from bench.orchestration.store import ArtifactStore, check_cache_dir

Sizes = dict[str, tuple[int, int] | None]  # dataset entry (JSON) -> (train, test) images, if known


def nominal_sizes(cells: list[Cell], data_root: str | Path | None = None) -> Sizes:
    """(train, test) sizes of each dataset entry of the cells, from its metadata (no loading)."""
    out: Sizes = {}
    for cell in cells:
        key = cell.dataset.model_dump_json(exclude={"label"})
        if key not in out:
            meta = DATASETS.create(cell.dataset.name, cell.dataset.params).metadata(resolve_data_root(data_root))
            known = meta.train_size is not None and meta.test_size is not None
            out[key] = (meta.train_size, meta.test_size) if known else None  # type: ignore[assignment]
    return out


def fresh_plan(config: GridConfig, data_root: str | Path | None = None) -> Plan:
    """Every job the grid needs when nothing is done or cached yet (for whole-grid estimates)."""
    with tempfile.TemporaryDirectory() as empty:
        return build_plan(compile_grid(config, data_root), RecordStore(Path(empty)), ArtifactStore(Path(empty)))


def _count(n: float | None) -> str:
    return "?" if n is None else f"{n:,.0f}"


def describe_plan(config: GridConfig, run_dir: Path, cache_dir: Path, data_root: str | Path | None = None) -> str:
    """A human-readable listing of the grid's cells and the work that remains."""
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
    return "\n".join(lines)


def work_summary(config: GridConfig, plan: Plan, data_root: str | Path | None = None) -> list[str]:
    """Remaining jobs by kind, with their image-passes where the sizes are known."""
    jobs = list(plan)
    models = [j for j in jobs if j.kind in ("model", "clean")]
    fits = [j for j in jobs if j.kind == "defense"]
    evals = [j for j in jobs if j.kind == "cell"]
    epochs = config.train.epochs
    sizes = nominal_sizes(plan.cells, data_root)
    train_passes = _sum(_train_images(config, j.cell, sizes) for j in models)
    fit_passes = _sum(_fit_passes(config, j.cell, sizes) for j in fits)
    eval_images = _sum(_eval_images(j.cell, sizes) for j in evals)
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


def _sizes(cell: Cell, sizes: Sizes) -> tuple[int, int] | None:
    return sizes[cell.dataset.model_dump_json(exclude={"label"})]


def _train_images(config: GridConfig, cell: Cell, sizes: Sizes) -> float | None:
    known = _sizes(cell, sizes)
    return None if known is None else known[0] * (1 - config.holdout)


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
