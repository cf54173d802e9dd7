"""Cell records: one JSON file per finished grid cell, the unit every result is built from.

The orchestration layer writes them (one per cell, atomically); tables, figures and reports
read them. A record holds the cell's metrics, its full configuration, seed, library versions
and wall times (see :meth:`bench.orchestration.runner.CellRunner.run`). Beside it, a cell may
have the penultimate features of its t-SNE sample (:mod:`bench.core.tsne_sample`), from which the
t-SNE figures are drawn, and the defense's illustration images (:mod:`bench.core.illustrations`).

Records are written atomically, but a disk can still damage one, or a user can edit one. A record
that does not parse, or is not an object with the keys every reader relies on, is moved aside to
``<cell_id>.json.damaged`` with a one-line warning: its cell then counts as not done and is
recomputed by the next run, and no reader ever crashes on it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from bench.core.errors import BenchError
from bench.core.files import atomic_write_json
from bench.core.illustrations import CellIllustrations, load_illustrations, save_illustrations
from bench.core.tsne_sample import CellFeatures, load_features, save_features

RECORDS_DIR = "records"
DAMAGED_SUFFIX = ".damaged"
# What tables, figures and status read from every record.
REQUIRED_KEYS = ("cell_id", "dataset", "model", "attack_label", "defense_label", "seed", "ba", "asr")


def record_problem(path: Path) -> tuple[dict | None, str | None]:
    """(the record, None) when ``path`` holds a whole record, else (None, what is wrong with it)."""
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except FileNotFoundError:
        return None, "missing"
    except PermissionError:
        raise BenchError(f"cannot read {path}: permission denied") from None
    except (UnicodeDecodeError, ValueError) as err:
        return None, f"not valid JSON ({err})"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        return None, f"no {', '.join(missing)}"
    if record["cell_id"] != Path(path).stem:
        return None, f"cell_id {record['cell_id']!r} does not match its file name"
    for key in ("ba", "asr"):
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, f"{key} is {value!r}, not a number"
    return record, None


class RecordStore:
    """One JSON file per finished grid cell, ``<run_dir>/records/<cell_id>.json``, and its t-SNE
    sample's features, ``<run_dir>/features/<cell_id>.npz``, and its illustration images,
    ``<run_dir>/illustrations/<cell_id>.npz``."""

    def __init__(self, run_dir: Path, repair: bool = True) -> None:
        """``repair=False`` only reads (``--dry-run``): a damaged record counts as missing but stays."""
        self.dir = Path(run_dir) / RECORDS_DIR
        self.repair = repair
        self.features_dir = Path(run_dir) / "features"
        self.illustrations_dir = Path(run_dir) / "illustrations"

    def path(self, cell_id: str) -> Path:
        return self.dir / f"{cell_id}.json"

    def _load(self, path: Path) -> dict | None:
        """The record at ``path``; a damaged one is moved aside (with a warning) and gives None."""
        record, problem = record_problem(path)
        if problem is None or problem == "missing" or not self.repair:
            return record
        aside = path.with_name(path.name + DAMAGED_SUFFIX)
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return None  # moved aside by another reader meanwhile
        print(f"warning: {path} is damaged ({problem}); moved it aside to {aside.name}, its cell will be "
              "recomputed", file=sys.stderr)  # fmt: skip
        return None

    def read(self, cell_id: str) -> dict | None:
        """The cell's record, or None when there is none (or it was damaged and moved aside)."""
        return self._load(self.path(cell_id))

    def features_path(self, cell_id: str) -> Path:
        return self.features_dir / f"{cell_id}.npz"

    def has(self, cell_id: str) -> bool:
        """Whether the cell has a whole record (a damaged one is moved aside and does not count)."""
        return self.path(cell_id).exists() and self.read(cell_id) is not None

    def illustrations_path(self, cell_id: str) -> Path:
        return self.illustrations_dir / f"{cell_id}.npz"

    def write(
        self, record: dict, features: CellFeatures | None = None, illustrations: CellIllustrations | None = None
    ) -> None:
        """Write the features and illustrations first: the record marks the cell finished, so a run
        killed between the writes computes the cell again rather than leave it without them."""
        if features is not None:
            save_features(features, self.features_path(record["cell_id"]))
        if illustrations is not None:
            save_illustrations(illustrations, self.illustrations_path(record["cell_id"]))
        atomic_write_json(record, self.path(record["cell_id"]))

    def read_features(self, cell_id: str) -> CellFeatures | None:
        """The cell's saved t-SNE features; None when it has none (or the file is damaged)."""
        return load_features(self.features_path(cell_id))

    def read_illustrations(self, cell_id: str) -> CellIllustrations | None:
        """The cell's saved illustration images; None when it has none (or the file is damaged)."""
        return load_illustrations(self.illustrations_path(cell_id))

    def read_all(self) -> Iterator[dict]:
        """Every whole record, in file-name order; damaged ones are moved aside and skipped."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("*.json")):
            record = self._load(path)
            if record is not None:
                yield record

    def damaged(self) -> dict[str, Path]:
        """cell id -> the damaged record moved aside for it."""
        if not self.dir.is_dir():
            return {}
        suffix = ".json" + DAMAGED_SUFFIX
        return {p.name.removesuffix(suffix): p for p in sorted(self.dir.glob("*" + suffix))}
