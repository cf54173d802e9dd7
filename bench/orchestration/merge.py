"""Merging run directories: one table and report from a grid run in slices.

A grid too big for one sitting (the paper grid on a GPU lent for minutes) runs in slices, each
its own run directory: the same config with ``--set 'attacks=[...]'`` (or defenses, or seeds).
``run_bench.py table SLICE [SLICE ...] --out DIR`` puts their records, saved t-SNE features and
figures into DIR and writes its tables, figures and report as if one run had computed every cell.

Merging is only honest when the slices are slices of one experiment, so it refuses (one line,
before writing anything) records whose resolved configurations disagree on anything but the
lists that define a slice -- :data:`SLICE_FIELDS` -- and a cell found twice with different
numbers. Rows and columns keep the order in which the slices (in the order given) list their
attacks, defenses and seeds, so the merged table is the table one run of the combined lists
writes. The merged ``config.yaml`` is that combined grid.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.core.errors import BenchError
from bench.core.files import atomic_write_json, atomic_write_text, read_json_object
from bench.core.records import RecordStore
from bench.orchestration.locks import RunLock
from bench.orchestration.rundir import MARKER, is_run_dir
from bench.report.page import make_figures
from bench.report.plots import FIGURE_DIR
from bench.report.tables import write_tables

# The config lists a slice is cut along (and its name); every other setting must be equal.
SLICE_FIELDS = ("name", "attacks", "defenses", "seeds")
METRIC_KEYS = ("ba", "asr", "ra")
MERGED_FILES = ("cells.csv", "table.md", "table.csv", "table.tex", "report.html", "config.yaml")


def shared_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved config without the fields a slice may set differently."""
    return {key: value for key, value in config.items() if key not in SLICE_FIELDS}


def first_difference(a: Any, b: Any, where: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, value in a, value in b) of the first place two parsed configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    return None if a == b else (where or "(top level)", a, b)


class _Slice:
    """One input run directory: its records, sorted in its own grid order."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        if not (self.dir / "records").is_dir():
            raise BenchError(f"{self.dir} is not a run directory (no records/ inside)")
        self.store = RecordStore(self.dir, repair=False)
        self.records = sorted(self.store.read_all(), key=lambda r: tuple(r.get("order", ())))
        if not self.records:
            raise BenchError(f"{self.dir} has no finished cells to merge")
        for record in self.records:
            if not isinstance(record.get("config"), dict):
                raise BenchError(f"{self.store.path(record['cell_id'])} holds no resolved config; it cannot be "
                                 "checked against the other slices")  # fmt: skip


def _check_same_experiment(slices: list[_Slice]) -> dict[str, Any]:
    """The shared settings of every record, which must all agree; returned for the merged config."""
    base_slice, base = slices[0], slices[0].records[0]
    shared = shared_settings(base["config"])
    for part in slices:
        for record in part.records:
            found = first_difference(shared, shared_settings(record["config"]))
            if found:
                key, ours, theirs = found
                raise BenchError(
                    f"cannot merge: {part.dir} (cell {record['cell_id']}) has {key} = {json.dumps(theirs)} but "
                    f"{base_slice.dir} (cell {base['cell_id']}) has {json.dumps(ours)}; slices may differ only in "
                    f"{', '.join(SLICE_FIELDS[1:])}"
                )
    return shared


def _numbers(record: dict) -> dict[str, Any]:
    return {key: record.get(key) for key in METRIC_KEYS}


def _check_duplicates(slices: list[_Slice]) -> dict[str, tuple[_Slice, dict]]:
    """cell id -> (slice, record) of its first occurrence; a cell seen twice must have equal numbers."""
    cells: dict[str, tuple[_Slice, dict]] = {}
    for part in slices:
        for record in part.records:
            seen = cells.get(record["cell_id"])
            if seen is None:
                cells[record["cell_id"]] = (part, record)
            elif _numbers(seen[1]) != _numbers(record):
                label = f"{record['attack_label']} / {record['defense_label']} seed {record['seed']}"
                raise BenchError(f"cannot merge: cell {record['cell_id']} ({label}) is in {seen[0].dir} with "
                                 f"{_numbers(seen[1])} and in {part.dir} with {_numbers(record)}")  # fmt: skip
    return cells


def _positions(slices: list[_Slice], key: Callable[[dict], Any]) -> dict[Any, int]:
    """First-seen position of each value of ``key`` over the slices' records, in grid order."""
    seen: dict[Any, int] = {}
    for part in slices:
        for record in part.records:
            seen.setdefault(key(record), len(seen))
    return seen


def _combined_list(slices: list[_Slice], field: str) -> list[Any]:
    """The slices' ``field`` lists (attacks, defenses, seeds) joined, each entry once, first seen first."""
    seen: dict[str, Any] = {}
    for part in slices:
        for config in dict.fromkeys(json.dumps(r["config"], sort_keys=True) for r in part.records):
            for entry in json.loads(config).get(field, []):
                seen.setdefault(json.dumps(entry, sort_keys=True), entry)
    return list(seen.values())


def check_merge_out(out: Path, inputs: list[Path]) -> None:
    """``--out`` must be new, empty or an earlier merge, and none of the inputs."""
    out = Path(out)
    if any(out.resolve() == Path(p).resolve() for p in inputs):
        raise BenchError(f"--out {out} is one of the run directories being merged; choose a new directory")
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out} is an existing file, not a directory; choose a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        marker = read_json_object(out / MARKER)
        if not is_run_dir(out) or marker is None or "merged_from" not in marker:
            what = "a run directory written by 'run'" if is_run_dir(out) else "a non-empty directory"
            raise BenchError(f"--out {out} is {what}, not an earlier merge; choose a new or empty directory")


def _clear_earlier_merge(out: Path) -> None:
    """Remove what an earlier merge into ``out`` wrote (records, features, illustrations, figures, tables)."""
    for sub in ("records", "features", "illustrations", FIGURE_DIR):
        shutil.rmtree(out / sub, ignore_errors=True)
    for name in MERGED_FILES:
        (out / name).unlink(missing_ok=True)


def _copy_keeping_time(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, dest)


def merge_runs(run_dirs: list[Path], out: Path, tsne: bool = True) -> tuple[str, int]:
    """Merge the run directories into ``out``; return (Markdown table, number of cells).

    Records are copied with their grid position renumbered for the combined grid (everything
    else unchanged); saved features, illustrations and the slices' figures are copied with their times, so a
    t-SNE figure a slice already drew is not drawn again (``tsne``: draw the missing ones).
    """
    run_dirs = [Path(p) for p in run_dirs]
    check_merge_out(out, run_dirs)
    slices = [_Slice(p) for p in run_dirs]
    shared = _check_same_experiment(slices)
    cells = _check_duplicates(slices)
    attacks = _positions(slices, lambda r: r["attack_label"])
    defenses = _positions(slices, lambda r: r["defense_label"])
    seeds = _positions(slices, lambda r: r["seed"])
    config = {"name": slices[0].records[0]["config"].get("name"), **shared,
              **{field: _combined_list(slices, field) for field in SLICE_FIELDS[1:]}}  # fmt: skip

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        _clear_earlier_merge(out)
        atomic_write_json({"format": 1, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "merged_from": [str(p) for p in run_dirs]}, out / MARKER)  # fmt: skip
        atomic_write_text(yaml.safe_dump(config, sort_keys=False), out / "config.yaml")
        store = RecordStore(out)
        for part in slices:
            for source in sorted((part.dir / FIGURE_DIR).glob("*")):
                if source.is_file() and source.suffix in (".png", ".pdf", ".csv"):
                    _copy_keeping_time(source, out / FIGURE_DIR / source.name)
        for cell_id, (part, record) in cells.items():
            order = list(record.get("order", (0, 0, 0, 0, 0)))
            order[2:5] = [attacks[record["attack_label"]], defenses[record["defense_label"]], seeds[record["seed"]]]
            for saved, dest in ((part.store.features_path(cell_id), store.features_path(cell_id)),
                                (part.store.illustrations_path(cell_id), store.illustrations_path(cell_id))):
                if saved.is_file():
                    _copy_keeping_time(saved, dest)
            source = part.store.path(cell_id)
            atomic_write_json({**record, "order": order}, store.path(cell_id))
            stat = source.stat()
            os.utime(store.path(cell_id), ns=(stat.st_atime_ns, stat.st_mtime_ns))
        markdown = write_tables(out)
        make_figures(out, tsne=tsne, strict=False, redraw=False)
    return markdown, len(cells)
