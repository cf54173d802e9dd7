"""Inter-process locks of the orchestration: one per run directory, and who holds what.

The run lock keeps two drivers out of one run directory; a second ``run`` into a busy
directory is a user error (exit 2) rather than two schedulers racing over the same records.
Like the per-artifact cache locks (:mod:`bench.core.locks`) it is ``flock`` based, so the
kernel releases it when its holder dies.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from bench.core.errors import BenchError
from bench.core.files import read_json_object

RUN_LOCK_FILE = ".run.lock"


def this_process() -> dict[str, object]:
    """Who holds something: enough for ``status`` to tell a live driver from a dead one."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def process_alive(info: dict | None) -> bool | None:
    """True/False for a process on this host; None when it ran elsewhere (cannot tell)."""
    if not info or info.get("host") != socket.gethostname():
        return None
    try:
        pid = int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return None  # a run.json without a usable pid
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive use of a run directory by one driver; fails at once when another holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._lock = FileLock(self.run_dir / RUN_LOCK_FILE)

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            holder = read_json_object(self.run_dir / "run.json") or {}
            who = f" (pid {holder.get('pid')} on {holder.get('host')})" if holder else ""
            raise BenchError(f"another run is using {self.run_dir}{who}; wait for it or choose another --out") from None
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._lock.release()
