"""Read CIFAR-10's python batch files without executing anything they contain.

The official ``cifar-10-batches-py`` release stores each batch as a pickle (written by Python 2,
protocol 2): a dict of strings, a list of labels, a list of file names and one uint8 numpy array.
A plain ``pickle.load`` of such a file runs whatever callable the file names, so a crafted file
in the data root would run code. This unpickler admits exactly the globals those files refer to
-- numpy's array reconstructor, ``ndarray`` and ``dtype`` (under their numpy 1 and numpy 2 module
names), and the latin-1 ``_codecs.encode`` that Python 3 writes for bytes at protocol 2 -- and
none of them is given to numpy: arrays are rebuilt here from their shape, a plain numeric dtype
and raw bytes, so no pickled state ever reaches numpy's own ``__setstate__``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from bench.core.errors import BenchError


class _Refused(Exception):
    """The file holds something a CIFAR-10 batch never does."""


class _NdarrayType:
    """Stands for ``numpy.ndarray`` as the first argument of the reconstructor, and nothing else."""


class _DtypeStub:
    """A dtype as pickled: ``numpy.dtype(spec, align, copy)`` followed by its state."""

    _PLAIN = re.compile(r"^[biuf][1248]$")

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(spec, str) or not self._PLAIN.match(spec):
            raise _Refused(f"a dtype {spec!r} (only plain numeric dtypes are read)")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state: Any) -> None:
        # (version, byte order, subarray, names, fields, itemsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) not in (8, 9):
            raise _Refused("a dtype state of an unknown form")
        order, subarray, names, fields, flags = state[1], state[2], state[3], state[4], state[7]
        if order not in ("<", ">", "|", "=") or subarray is not None or names is not None or fields is not None:
            raise _Refused("a structured dtype")
        if flags not in (0, False):
            raise _Refused("a dtype with object flags")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


class _ArrayStub:
    """An array as pickled: ``_reconstruct(ndarray, shape, dtype)`` followed by its state."""

    def __init__(self, subtype: Any, shape: Any = None, dtype: Any = None) -> None:
        if subtype is not _NdarrayType:
            raise _Refused("an array of a class other than numpy.ndarray")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        # (version, shape, dtype, is_fortran, raw data)
        if not isinstance(state, tuple) or len(state) != 5:
            raise _Refused("an array state of an unknown form")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DtypeStub):
            raise _Refused("an array without a plain dtype")
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise _Refused(f"an array shape {shape!r}")
        if isinstance(raw, str):  # a Python 2 byte string, decoded as latin-1 by the unpickler
            raw = raw.encode("latin-1")
        if not isinstance(raw, bytes):
            raise _Refused("array data that are not bytes")
        count = int(np.prod(shape, dtype=np.int64))
        if len(raw) != count * dtype.dtype.itemsize:
            raise _Refused(f"{len(raw)} bytes of data for an array of shape {shape}")
        flat = np.frombuffer(raw, dtype=dtype.dtype, count=count)
        self.array = flat.reshape(shape, order="F" if fortran else "C")


def _latin1_encode(text: Any, encoding: Any = "latin-1") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to pickle bytes at protocol 2, and only that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"a call of _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _ArrayStub,
    ("numpy._core.multiarray", "_reconstruct"): _ArrayStub,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _DtypeStub,
    ("_codecs", "encode"): _latin1_encode,
}


class _BatchUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcode table can be narrowed, the C one's cannot) with two
    gates: globals come from :data:`_ALLOWED` only, and state is set on array and dtype
    stand-ins only (a pickle may not set attributes on anything else, not even on these classes)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"a reference to {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent reference")

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, (_ArrayStub, _DtypeStub)):
            raise _Refused(f"state for a {type(target).__name__} object")
        target.__setstate__(state)

    dispatch[pickle.BUILD[0]] = load_build


def _resolve(obj: Any) -> Any:
    """Replace the array stand-ins by their arrays, in the dicts and lists that hold them."""
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            raise _Refused("an array without data")
        return obj.array
    if isinstance(obj, (_DtypeStub, _NdarrayType)) or obj is _NdarrayType:
        raise _Refused("a bare numpy type")
    if isinstance(obj, dict):
        return {_resolve(k): _resolve(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def load_batch(path: Path) -> dict[str, Any]:
    """One batch file as ``{"data": uint8 array (N, 3072), "labels": int64 array (N,)}``.

    Anything else -- another pickle, a crafted file, a truncated one -- is refused with one line
    naming the file; nothing in it is executed.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            batch = _resolve(_BatchUnpickler(fh, encoding="latin1").load())
    except _Refused as err:
        raise BenchError(f"{path} is not a CIFAR-10 python batch file: it contains {err}; refusing to read it") from None
    except OSError as err:
        raise BenchError(f"cannot read {path}: {err.strerror or err}") from None
    except Exception as err:  # truncated or garbled pickle: EOFError, UnpicklingError, ValueError ...
        raise BenchError(f"{path} is not a readable CIFAR-10 python batch file ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise BenchError(f"{path} is not a CIFAR-10 python batch file: expected a dict with 'data' and 'labels'")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise BenchError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), "
                         f"got {getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")  # fmt: skip
    labels_ok = labels.shape == (data.shape[0],) and labels.dtype.kind in "iu"
    if not labels_ok or (labels.size and not 0 <= labels.min() <= labels.max() <= 9):
        raise BenchError(f"{path}: 'labels' must be {data.shape[0]} integers in 0..9, one per image")
    return {"data": data, "labels": labels.astype(np.int64)}
