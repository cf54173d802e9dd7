"""Inter-process locks: one per artifact in the shared cache, one per run directory.

Two workers (processes on one machine, or Ray tasks on several machines sharing the cache
directory) may reach the same missing artifact at the same time. The artifact lock makes the
second one wait while the first trains it, then load the result instead of training it again.
The locks are ``fcntl``/``flock`` based (the ``filelock`` package), so the kernel releases them
when the holder dies: a killed worker never leaves a stale lock behind. On a network file
system the locks need working POSIX locking (NFSv4, Lustre, GPFS and CephFS have it).

The run lock keeps two drivers out of one run directory; a second ``run`` into a busy
directory is a user error (exit 2) rather than two schedulers racing over the same records.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from bench.core.errors import BenchError
from bench.core.files import read_json

LOCK_DIR = "locks"


def artifact_lock(cache_root: Path, kind: str, key: str) -> FileLock:
    """The lock that guards the creation of ``<cache_root>/<kind>/<key>.pt``."""
    path = Path(cache_root) / LOCK_DIR / f"{kind}-{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def this_process() -> dict[str, object]:
    """Who holds something: enough for ``status`` to tell a live driver from a dead one."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def process_alive(info: dict | None) -> bool | None:
    """True/False for a process on this host; None when it ran elsewhere (cannot tell)."""
    if not info or info.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive use of a run directory by one driver; fails at once when another holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._lock = FileLock(self.run_dir / ".run.lock")

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            holder = read_json(self.run_dir / "run.json") or {}
            who = f" (pid {holder.get('pid')} on {holder.get('host')})" if holder else ""
            raise BenchError(f"another run is using {self.run_dir}{who}; wait for it or choose another --out") from None
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._lock.release()
