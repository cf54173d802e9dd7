"""Crash-safe files: atomic writes, checksummed artifacts and per-cell JSON records.

A run can be killed at any instant. Every file is therefore written to a temporary name in the
same directory and renamed into place (an atomic operation on POSIX file systems), so a reader
sees either the old file, the complete new file, or nothing -- never a partial one. Artifacts
(trained models, fitted defense states) carry a SHA-256 of their payload; one that fails to
load or to verify is treated as missing and recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock


def _atomic_write_bytes(data: bytes, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete the temporary files of writers killed before their rename (call under a lock)."""
    removed = [p for p in Path(root).rglob(".*.tmp") if p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def atomic_write_text(text: str, path: Path) -> None:
    _atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_write_bytes(buffer.getvalue(), path)


def read_json(path: Path) -> Any | None:
    """The parsed JSON file, or None when it is missing or unreadable."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short content hash of a JSON-able object, independent of dict key order."""
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:length]


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
        from bench.locks import artifact_lock

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
