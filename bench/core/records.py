"""Cell records: one JSON file per finished grid cell, the unit every result is built from.

The orchestration layer writes them (one per cell, atomically); tables, figures and reports
read them. A record holds the cell's metrics, its full configuration, seed, library versions
and wall times (see :meth:`bench.orchestration.runner.CellRunner.run`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from bench.core.files import atomic_write_json


class RecordStore:
    """One JSON file per finished grid cell: ``<run_dir>/records/<cell_id>.json``."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir) / "records"

    def path(self, cell_id: str) -> Path:
        return self.dir / f"{cell_id}.json"

    def has(self, cell_id: str) -> bool:
        return self.path(cell_id).exists()

    def write(self, record: dict) -> None:
        atomic_write_json(record, self.path(record["cell_id"]))

    def read_all(self) -> Iterator[dict]:
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("*.json")):
            with open(path) as fh:
                yield json.load(fh)
