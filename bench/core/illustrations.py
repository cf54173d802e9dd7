"""Illustration images of a cell: a few poisoned test images and what the defense makes of them.

Some defenses produce images worth looking at: BTI-DBF inverts the backdoor into a generator
whose output is what it believes the backdoored version of an image looks like, and its
purifier turns poisoned inputs back into clean-looking ones. A defense says so through
:meth:`defenses.base.Defense.illustrations`; when a cell is evaluated, the runner passes it a
seeded choice of poisoned non-target test images (the same images for every cell of one
(dataset, model, attack, seed)) with their clean originals and saves what comes back beside the
cell's record. Figures are drawn from those files alone, like the t-SNE figures.

Files are NumPy ``.npz`` archives of uint8 images (N, C, H, W) and int64 labels, written
atomically and read with ``allow_pickle=False``, so nothing in them is ever executed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.core.device import to_uint8
from bench.core.files import atomic_write_npz, read_npz
from bench.core.seeding import generator

RESERVED = ("clean", "poisoned", "labels", "index", "rows", "classes")  # arrays every file holds
ROW_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def choose_images(count: int, poisoned_count: int, seed: int) -> Tensor:
    """Sorted indices of ``count`` poisoned test images (target class already removed), seeded by
    the cell seed alone so that every cell of one attack and seed shows the same images."""
    order = torch.randperm(poisoned_count, generator=generator(seed, "illustrations"))
    return torch.sort(order[: min(count, poisoned_count)]).values


@dataclass
class CellIllustrations:
    """The chosen images (uint8, N x C x H x W) and the defense's rows of the same images."""

    clean: np.ndarray  # the clean originals of the poisoned images
    poisoned: np.ndarray
    labels: np.ndarray  # (N,) true labels
    index: np.ndarray  # (N,) positions in the poisoned test set
    classes: list[str]  # the dataset's class names
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. inverted, purified; in display order

    @classmethod
    def from_tensors(cls, clean: Tensor, poisoned: Tensor, labels: Tensor, index: Tensor, classes: list[str],
                     rows: dict[str, Tensor]) -> CellIllustrations:  # fmt: skip
        """Check what a defense returned (names, shapes, finite values in [0, 1]) and convert to uint8.

        A defense that breaks the contract is a programming error, raised as ``ValueError``.
        """
        images = {}
        for name, value in rows.items():
            if not ROW_NAME.match(name) or name in RESERVED:
                raise ValueError(f"illustration row {name!r} must be a lower-case identifier other than {RESERVED}")
            if tuple(value.shape) != tuple(poisoned.shape):
                raise ValueError(f"illustration row {name!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(poisoned.shape)} (one image per input)")  # fmt: skip
            value = value.detach().float().cpu()
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"illustration row {name!r} holds non-finite values")
            images[name] = to_uint8(value.clamp(0, 1)).numpy()
        as_uint8 = [to_uint8(t.detach().float().cpu()).numpy() if t.dtype != torch.uint8 else t.cpu().numpy()
                    for t in (clean, poisoned)]  # fmt: skip
        return cls(as_uint8[0], as_uint8[1], labels.cpu().numpy().astype(np.int64),
                   index.cpu().numpy().astype(np.int64), list(classes), images)  # fmt: skip


def save_illustrations(item: CellIllustrations, path: Path) -> None:
    """Write ``item`` to ``path`` (``.npz``) atomically."""
    arrays = {"clean": np.asarray(item.clean, np.uint8), "poisoned": np.asarray(item.poisoned, np.uint8),
              "labels": np.asarray(item.labels, np.int64), "index": np.asarray(item.index, np.int64),
              "rows": np.asarray(list(item.rows), dtype=np.str_), "classes": np.asarray(item.classes, dtype=np.str_)}  # fmt: skip
    arrays.update({name: np.asarray(value, np.uint8) for name, value in item.rows.items()})
    atomic_write_npz(arrays, path)


def load_illustrations(path: Path) -> CellIllustrations | None:
    """The illustrations saved at ``path``; None when the file is missing, unreadable or malformed."""
    arrays = read_npz(path)
    if arrays is None:
        return None
    try:
        names = [str(n) for n in arrays["rows"]]
        item = CellIllustrations(arrays["clean"], arrays["poisoned"], arrays["labels"], arrays["index"],
                                 [str(c) for c in arrays["classes"]], {name: arrays[name] for name in names})  # fmt: skip
    except KeyError:
        return None
    images = [item.clean, item.poisoned, *item.rows.values()]
    ok = (
        all(a.dtype == np.uint8 and a.ndim == 4 and a.shape == item.poisoned.shape for a in images)
        and item.labels.shape == item.index.shape == (item.poisoned.shape[0],)
        and (item.labels.size == 0 or (0 <= item.labels.min() and item.labels.max() < len(item.classes)))
    )
    return item if ok else None
