"""Run directories: which folders the harness may write into, and its own debris in them.

``run --out DIR`` writes tables, records and logs into DIR, and at start-up removes what killed
writers left there. Pointed at the wrong folder (a home directory, a typo'd path that exists),
that would mix run files into the user's files. So a run directory must be new, empty, or an
earlier run of this harness -- recognised by the marker file the harness writes into it before
anything else -- and the start-up sweep removes only temporaries the harness names itself
(:func:`bench.core.files.temp_path`), only in the folders the harness writes.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.core.errors import BenchError
from bench.core.files import atomic_write_json, harness_temps, read_json_object, remove_path
from bench.core.records import RECORDS_DIR
from bench.orchestration.locks import RUN_LOCK_FILE

MARKER = ".backdoor-bench-run"


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory of this harness: it carries the marker, or it was
    written by a version before the marker (which created the run lock's file first, and kept
    records/ next to the config snapshot)."""
    path = Path(path)
    if read_json_object(path / MARKER) is not None:
        return True
    legacy_lock = (path / RUN_LOCK_FILE).is_file()
    return legacy_lock or ((path / RECORDS_DIR).is_dir() and (path / "config.yaml").is_file())


def check_run_dir(path: Path) -> None:
    """Refuse, before any work, an ``--out`` that is a file or a folder of someone else's files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BenchError(f"--out {path} is an existing file, not a directory; choose a new or empty directory")
    if path.is_dir() and any(path.iterdir()) and not is_run_dir(path):
        raise BenchError(f"--out {path} is a non-empty directory that is no run directory of this harness "
                         f"(no {MARKER} inside); choose a new or empty directory")  # fmt: skip


def claim_run_dir(path: Path) -> None:
    """Create the run directory (after :func:`check_run_dir`) and mark it as the harness's."""
    path = Path(path)
    check_run_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    if read_json_object(path / MARKER) is None:
        atomic_write_json({"format": 1, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, path / MARKER)


def run_subdirs() -> tuple[str, ...]:
    """The folders of a run directory the harness writes into ("" is the run directory itself)."""
    from bench.orchestration.status import JOBS_DIR, LOGS_DIR
    from bench.report.plots import FIGURE_DIR

    return ("", RECORDS_DIR, JOBS_DIR, LOGS_DIR, FIGURE_DIR)


def remove_run_temps(run_dir: Path) -> list[Path]:
    """Delete the temporaries of writers killed before their rename (call under the run lock)."""
    removed = [temp for sub in run_subdirs() for temp in harness_temps(Path(run_dir) / sub)]
    for temp in removed:
        remove_path(temp)
    return removed
