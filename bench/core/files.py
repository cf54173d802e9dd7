"""Crash-safe files: atomic writes, checked reads and content hashes.

A run can be killed at any instant. Every file is therefore written to a temporary name in the
same directory and renamed into place (an atomic operation on POSIX file systems), so a reader
sees either the old file, the complete new file, or nothing -- never a partial one. Every layer
that writes (data caches, artifacts, records, figures) goes through these functions.

Temporary names follow one pattern, ``.<target>.bench-<pid>-<random>.tmp``, so that the debris
of a killed writer can be told from anything else in a directory: the sweeps remove only names
the harness itself made (a user's own ``.notes.tmp`` is never touched), and the writer's pid in
the name helps to see whose it was.

Files are created with the mode any program gets from the user's umask (``0666 & ~umask``), so a
group-shared results folder or cache works as the umask says.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from bench.core.errors import BenchError

_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.bench-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (for a file or a directory), recognisably the harness's."""
    path = Path(path)
    return path.with_name(f".{path.name}.bench-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def temp_target(path: Path) -> Path | None:
    """The file or directory a harness temporary stands for; None for any other name."""
    match = _TEMP_NAME.match(Path(path).name)
    return Path(path).with_name(match["target"]) if match else None


def harness_temps(directory: Path, target: Path | None = None) -> list[Path]:
    """The harness's temporary files and folders directly in ``directory`` (not below it),
    only those standing for ``target`` when it is given."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in sorted(directory.iterdir()):
        stands_for = temp_target(entry)
        if stands_for is not None and (target is None or stands_for.name == Path(target).name):
            found.append(entry)
    return found


def remove_path(path: Path) -> None:
    """Delete a file or a whole folder; gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_bytes(data: bytes, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    # Mode 0666: the umask applies, as it does to any file the user creates.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def atomic_write_npz(arrays: dict[str, Any], path: Path) -> None:
    """Write plain NumPy arrays as a compressed ``.npz`` archive, atomically."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(buffer.getvalue(), path)


def read_npz(path: Path) -> dict[str, Any] | None:
    """Every array of an ``.npz`` archive, read with ``allow_pickle=False`` (nothing in it is ever
    executed); None when the file is missing, unreadable or holds objects that need unpickling."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def save_checksummed(obj: Any, path: Path) -> None:
    """Save a torch payload with the SHA-256 of its bytes, so that :func:`load_checksummed` can
    tell a damaged file (a bit flip on disk, a partial copy) from a good one.

    The serialised payload is stored as a uint8 tensor, not a Python ``bytes`` object: torch
    reads tensor storage in one go, but unpickles a large ``bytes`` object several times slower.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    view = buffer.getbuffer()
    wrapper = {"sha256": hashlib.sha256(view).hexdigest(), "payload": torch.frombuffer(view, dtype=torch.uint8)}
    atomic_torch_save(wrapper, path)


def load_checksummed(path: Path) -> Any | None:
    """What :func:`save_checksummed` saved; None when the file is missing, unreadable as a torch
    payload, or fails its checksum (the caller rebuilds it).

    Only tensors and plain containers are loaded (``weights_only``): a cache file never runs code.
    A file this user may not read is not damage: that is a :class:`BenchError`, never None, so
    that nobody deletes another user's good file.
    """
    path = Path(path)
    try:
        wrapper = torch.load(path, weights_only=True)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise BenchError(f"cannot read {path}: permission denied (a cache shared with other users needs "
                         "group read/write permissions, e.g. umask 002)") from None  # fmt: skip
    except Exception:
        return None
    try:
        payload = wrapper["payload"]  # a uint8 tensor; bytes in files written by earlier versions
        data = payload.numpy().tobytes() if isinstance(payload, torch.Tensor) else payload
        if hashlib.sha256(data).hexdigest() != wrapper["sha256"]:
            return None
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception:
        return None


def discard_damaged(path: Path) -> None:
    """Delete a cache file that failed to load or verify, so that it is rebuilt; a file this user
    may not delete is a clear error instead."""
    try:
        Path(path).unlink(missing_ok=True)
    except PermissionError:
        raise BenchError(f"{path} is damaged and this user may not replace it (permission denied); "
                         "ask its owner to delete it") from None  # fmt: skip


def read_json(path: Path) -> Any | None:
    """The parsed JSON file, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def read_json_object(path: Path) -> dict | None:
    """The JSON file when it holds an object; None when it is missing, unreadable or anything else."""
    data = read_json(path)
    return data if isinstance(data, dict) else None
def _require_plain_json(obj: Any, where: str = "$") -> None:
    """Raise TypeError unless ``obj`` is made of dicts with string keys, lists, strings, finite
    numbers, booleans and None: anything else would have to be stringified, and two different
    values (a Path and its string, 1 and "1" as keys) could then share a hash."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            raise TypeError(f"stable_hash: {where} is {obj}, not a finite number")
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _require_plain_json(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, item in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"stable_hash: {where} has a non-string key {key!r}")
            _require_plain_json(item, f"{where}.{key}")
        return
    raise TypeError(f"stable_hash: {where} is a {type(obj).__name__}, not a plain JSON value")


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short content hash of a plain JSON value, independent of dict key order.

    Only plain JSON is accepted (see :func:`_require_plain_json`): cache keys must never depend
    on how some object happens to print.
    """
    _require_plain_json(obj)
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(raw.encode()).hexdigest()[:length]
