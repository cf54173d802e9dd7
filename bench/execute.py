"""Run a whole grid into a run directory, skipping cells that already have a record."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from bench.config import GridConfig
from bench.data import DataPaths
from bench.device import resolve_device
from bench.grid import Cell, compile_grid
from bench.report import write_tables
from bench.runner import CellRunner
from bench.store import ArtifactStore, RecordStore, atomic_write_text


def write_config_snapshot(config: GridConfig, run_dir: Path) -> None:
    import yaml

    atomic_write_text(yaml.safe_dump(config.resolved(), sort_keys=False), run_dir / "config.yaml")


def run_grid(
    config: GridConfig,
    run_dir: Path,
    paths: DataPaths,
    device: str | None = None,
) -> tuple[list[Cell], int, str]:
    """Compute every unfinished cell; return (cells, number computed now, Markdown table)."""
    cells = compile_grid(config)  # validates names and parameters before any work
    dev = resolve_device(device or config.device)
    run_dir = Path(run_dir)
    records = RecordStore(run_dir)
    pending = [c for c in cells if not records.has(c.cell_id)]
    runner = CellRunner(config, paths, ArtifactStore(paths.cache_dir), dev)
    if pending:
        runner.dataset(pending[0].dataset)  # fail on missing data before creating the run dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config_snapshot(config, run_dir)
    for cell in tqdm(pending, desc="grid", unit="cell", disable=None):
        records.write(runner.run(cell))
    return cells, len(pending), write_tables(run_dir, {c.cell_id for c in cells})
