"""Per-artifact locks for the shared cache, and the sweep of what killed writers left there.

Two workers (processes on one machine, or Ray tasks on several machines sharing the cache
directory) may reach the same missing artifact -- a decoded dataset, an unpacked tarball, a
trained model, a fitted defense -- at the same time. The artifact lock makes the second one wait
while the first builds it, then load the result instead of building it again. The locks are
``fcntl``/``flock`` based (the ``filelock`` package), so the kernel releases them when the
holder dies: a killed worker never leaves a stale lock behind. On a network file system the
locks need working POSIX locking (NFSv4, Lustre, GPFS and CephFS have it).

Every write into the cache happens under the lock of the artifact it writes. That is what makes
the sweep safe in a cache that live runs share: a temporary file whose artifact lock can be
taken at once has no live writer, so it is debris of a killed one.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

from bench.core.files import harness_temps, remove_path, temp_target

LOCK_DIR = "locks"


def artifact_lock(cache_root: Path, kind: str, key: str) -> FileLock:
    """The lock that guards the creation of ``<cache_root>/<kind>/<key>[.pt]``."""
    path = Path(cache_root) / LOCK_DIR / f"{kind}-{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def lock_for(path: Path) -> FileLock:
    """The artifact lock of a cache entry ``<cache_root>/<kind>/<name>`` (a file or a folder)."""
    path = Path(path)
    return artifact_lock(path.parent.parent, path.parent.name, path.name.removesuffix(".pt"))


def remove_temps_of(path: Path) -> list[Path]:
    """Remove the temporaries a killed writer of ``path`` left; the caller holds ``path``'s lock."""
    removed = harness_temps(Path(path).parent, target=path)
    for temp in removed:
        remove_path(temp)
    return removed


def sweep_cache_temps(cache_root: Path, kinds: tuple[str, ...]) -> list[Path]:
    """Remove, in the cache's ``kinds`` folders, the temporaries of writers that no longer live.

    A temporary is removed only while its artifact's lock is held by this sweep; one whose
    artifact is being written right now (by this or another run) is left to its writer.
    """
    removed: list[Path] = []
    for kind in kinds:
        for temp in harness_temps(Path(cache_root) / kind):
            target = temp_target(temp)
            assert target is not None
            lock = lock_for(target)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # a live writer holds it
            try:
                removed += remove_temps_of(target)
            finally:
                lock.release()
    return removed
