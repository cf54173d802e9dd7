"""The artifact cache: checksummed, content-addressed torch payloads.

Artifacts (trained models, fitted defense states, and the sub-results defenses share, such as
BDMAE's autoencoder: ``shared-<kind>/``) carry a SHA-256 of their payload; one that
fails to load or to verify is treated as missing and recomputed, while one this user may not
read is an error (it belongs to someone else; deleting it would be wrong). Files are written
atomically under the artifact's lock (:mod:`bench.core.files`, :mod:`bench.core.locks`), and
:func:`sweep_cache` removes what killed writers left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from filelock import FileLock

from bench.core.data import DATA_CACHE_DIR
from bench.core.errors import BenchError
from bench.core.files import discard_damaged, load_checksummed, save_checksummed
from bench.core.locks import artifact_lock, remove_temps_of, sweep_cache_temps

# The cache's folders: what ArtifactStore users store, and the decoded datasets.
ARTIFACT_KINDS = ("models", "defenses")
SHARED_PREFIX = "shared-"  # shared defense sub-results live in <cache>/shared-<kind>/


def sweep_cache(cache_root: Path) -> list[Path]:
    """Remove the temporaries of killed writers from the cache (never those of a live writer)."""
    root = Path(cache_root)
    shared = tuple(p.name for p in root.glob(SHARED_PREFIX + "*") if p.is_dir()) if root.is_dir() else ()
    return sweep_cache_temps(root, (DATA_CACHE_DIR, *ARTIFACT_KINDS, *shared))


def check_cache_dir(path: Path) -> None:
    """A cache directory must be a directory or not exist yet (it is created on first use)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BenchError(f"cache directory {path} exists and is not a directory; pass another --cache-dir")


class ArtifactStore:
    """Content-addressed cache of torch payloads (``<root>/<kind>/<key>.pt``).

    Each file holds ``{"sha256": ..., "payload": bytes}`` where ``payload`` is the torch-serialised
    object; :meth:`load` returns ``None`` for a missing, unreadable or corrupted artifact.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.pt"

    def exists(self, kind: str, key: str) -> bool:
        """Whether the artifact is there (not whether it verifies: :meth:`load` checks that)."""
        return self.path(kind, key).exists()

    def lock(self, kind: str, key: str) -> FileLock:
        """Hold it from a :meth:`load` miss to the :meth:`save`, so no two workers compute one artifact."""
        return artifact_lock(self.root, kind, key)

    def load(self, kind: str, key: str) -> Any | None:
        """The artifact, or None when it is missing or damaged (a damaged one is deleted, so that
        it is rebuilt). Call under :meth:`lock`."""
        path = self.path(kind, key)
        obj = load_checksummed(path)
        if obj is None and path.exists():
            discard_damaged(path)
        return obj

    def save(self, kind: str, key: str, obj: Any) -> Path:
        """Write the artifact (call under :meth:`lock`), after removing what a killed writer of it left."""
        path = self.path(kind, key)
        remove_temps_of(path)
        save_checksummed(obj, path)
        return path
