"""The artifact cache: checksummed, content-addressed torch payloads (models, defense states).

Artifacts (trained models, fitted defense states) carry a SHA-256 of their payload; one that
fails to load or to verify is treated as missing and recomputed. Files are written atomically
(:mod:`bench.core.files`), and :func:`remove_stale_temps` sweeps what killed writers left.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from bench.core.files import atomic_torch_save


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete the temporary files of writers killed before their rename (call under a lock)."""
    removed = [p for p in Path(root).rglob(".*.tmp") if p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed



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
        from bench.orchestration.locks import artifact_lock

        return artifact_lock(self.root, kind, key)

    def load(self, kind: str, key: str) -> Any | None:
        path = self.path(kind, key)
        if not path.exists():
            return None
        try:
            wrapper = torch.load(path, weights_only=True)
            payload = wrapper["payload"]
            if hashlib.sha256(payload).hexdigest() != wrapper["sha256"]:
                raise ValueError("checksum mismatch")
            return torch.load(io.BytesIO(payload), weights_only=True)
        except Exception:
            path.unlink(missing_ok=True)
            return None

    def save(self, kind: str, key: str, obj: Any) -> Path:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        payload = buffer.getvalue()
        path = self.path(kind, key)
        atomic_torch_save({"sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}, path)
        return path
