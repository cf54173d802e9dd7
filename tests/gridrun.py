"""Helpers for tests that run whole grids through the command line in a subprocess.

Runs on different backends are compared bit for bit: every job runs with the grid's
``threads_per_job`` threads whatever the process it runs in was given, so the subprocesses get
the caller's environment unchanged. The uninterrupted reference run is computed once per test
session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent

# Six cells on three backdoored models. With two workers the third model trains only after the
# first records exist, so "some records exist, others do not yet" lasts a whole training run.
GRID = {
    "datasets": [{"name": "mnist5k", "train_subset": 2000, "test_subset": 600}],
    "models": [{"name": "small_cnn", "width": 8}],
    "attacks": ["badnets", {"name": "blended", "alpha": 0.1}, {"name": "blended", "alpha": 0.2}],
    "defenses": ["none", {"name": "shrinkpad", "pad": 2}],
    "seeds": [0],
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "milestones": [], "crop_padding": 2, "flip": False},
}
N_CELLS = 6

_REFERENCE: dict[str, Path] = {}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded here for code that runs outside a grid job (jobs set their own
    threads): no thread contention on a busy machine (tiny models gain nothing from a second thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_grid(path: Path, grid: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump(grid or GRID, sort_keys=False))
    return path


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def cli_command(config: Path, run_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "run_bench.py"), "run", str(config), "--out", str(run_dir),
            "--cache-dir", str(cache_dir), "--device", "cpu", "--no-tsne", *extra]  # fmt: skip


def run_cli(
    config: Path, run_dir: Path, cache_dir: Path, *extra: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(config, run_dir, cache_dir, *extra), cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def reference_run(tmp_path_factory: Any) -> Path:
    """The run directory of an uninterrupted, single-worker run of :data:`GRID` (once per session).

    It runs in this process (no start-up cost); its jobs get one thread from the grid's
    ``threads_per_job``, like the jobs of the subprocesses.
    """
    if "run" not in _REFERENCE:
        from bench.core.data import DataPaths
        from bench.orchestration.config import load_config
        from bench.orchestration.execute import run_grid

        base = tmp_path_factory.mktemp("reference")
        config = load_config(write_grid(base / "grid.yaml"))
        cells, computed, _ = run_grid(config, base / "run", DataPaths(base / "data", base / "cache"), "cpu", workers=1)
        assert len(cells) == computed == N_CELLS
        _REFERENCE["run"] = base / "run"
    return _REFERENCE["run"]


def assert_same_features(run_dir: Path, reference: Path) -> None:
    """Every cell saved the very features of the reference run (computed inline, in the driver)."""
    import numpy as np

    from bench.core.records import RecordStore

    mine, theirs = RecordStore(run_dir), RecordStore(reference)
    cell_ids = sorted(p.stem for p in (reference / "records").glob("*.json"))
    assert sorted(p.stem for p in (run_dir / "features").glob("*.npz")) == cell_ids
    for cell_id in cell_ids:
        a, b = mine.read_features(cell_id), theirs.read_features(cell_id)
        assert a is not None and b is not None
        for name in ("benign", "poisoned", "benign_labels", "poisoned_labels"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), f"{cell_id}: {name} differ"


def assert_complete_files(run_dir: Path, allow_temps: bool = False) -> None:
    """Every JSON file parses and every record is a whole record; no temporary file is left
    behind unless ``allow_temps`` (a writer killed between writing and renaming leaves one,
    under a hidden temporary name that no reader opens; the next run removes it)."""
    leftovers = [p for p in run_dir.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert allow_temps or not leftovers, f"temporary files left behind: {leftovers}"
    assert all(p.name.startswith(".") for p in leftovers)
    for path in run_dir.rglob("*.json"):
        json.loads(path.read_text())  # raises on a truncated file
    for path in (run_dir / "records").glob("*.json"):
        record = json.loads(path.read_text())
        assert record["cell_id"] == path.stem and "ba" in record and "asr" in record
