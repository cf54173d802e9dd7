"""The t-SNE sample of a cell: which test images it embeds, and their saved penultimate features.

A t-SNE figure shows where a defense puts benign and poisoned test images in the frozen model's
feature space. Pushing the images through every panel's defense again at plotting time would
repeat most of a cell's cost (BDMAE restores each image dozens of times), so the features are
captured while the cell is evaluated -- the sample is a subset of the clean and poisoned test sets
that evaluation pushes through the defense anyway -- and saved beside the cell's record. The
figure is drawn from those files alone: no model, no data, no artifact cache.

The sample depends on the cell seed and the test sets only, so every cell of one (dataset, model,
attack, seed) embeds the same images: ``per_class`` benign test images of each class and
``poisoned_per_class`` poisoned test images of each true class (the poisoned test set has no
target-class images).

Files are NumPy ``.npz`` archives of plain arrays (features as float16: a picture needs no more),
written atomically and read with ``allow_pickle=False``, so nothing in them is ever executed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.core.files import atomic_write_npz, read_npz
from bench.core.seeding import generator

FEATURE_DTYPE = np.float16


def per_class_index(y: Tensor, count: int, gen: torch.Generator) -> Tensor:
    """Up to ``count`` random indices of each class present in ``y``, sorted."""
    picks = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        picks.append(idx[torch.randperm(idx.numel(), generator=gen)[:count]])
    return torch.sort(torch.cat(picks)).values if picks else torch.empty(0, dtype=torch.long)


def sample_indices(
    clean_y: Tensor, poisoned_y: Tensor, per_class: int, poisoned_per_class: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Sorted indices into the clean and the poisoned test set: the images a t-SNE panel embeds.

    Balanced over (true) classes and seeded by the cell seed alone, so that all panels of a figure
    show the same images.
    """
    gen = generator(seed, "tsne")
    return per_class_index(clean_y, per_class, gen), per_class_index(poisoned_y, poisoned_per_class, gen)


@dataclass
class CellFeatures:
    """Penultimate features of one cell's t-SNE sample, behind the cell's defense.

    ``reference_*`` hold the undefended model's features of the same images. They are saved only
    when the grid has no ``none`` defense (a figure's first panel is always the undefended model),
    by the cells of the grid's first defense.
    """

    benign: np.ndarray  # (n_benign, d) float16
    poisoned: np.ndarray  # (n_poisoned, d) float16
    benign_labels: np.ndarray  # (n_benign,) int64
    poisoned_labels: np.ndarray  # (n_poisoned,) int64: the true labels of the poisoned images
    classes: list[str]
    target: int
    per_class: int
    poisoned_per_class: int
    reference_benign: np.ndarray | None = None
    reference_poisoned: np.ndarray | None = None

    def same_sample(self, other: CellFeatures) -> bool:
        """Whether both embed the same images (so they can share one figure)."""
        return (
            (self.per_class, self.poisoned_per_class, self.target) == (other.per_class, other.poisoned_per_class, other.target)
            and np.array_equal(self.benign_labels, other.benign_labels)
            and np.array_equal(self.poisoned_labels, other.poisoned_labels)
        )


def save_features(features: CellFeatures, path: Path) -> None:
    """Write ``features`` to ``path`` (``.npz``) atomically."""
    arrays = {
        "benign": np.asarray(features.benign, FEATURE_DTYPE),
        "poisoned": np.asarray(features.poisoned, FEATURE_DTYPE),
        "benign_labels": np.asarray(features.benign_labels, np.int64),
        "poisoned_labels": np.asarray(features.poisoned_labels, np.int64),
        "classes": np.asarray(features.classes, dtype=np.str_),
        "settings": np.asarray([features.target, features.per_class, features.poisoned_per_class], np.int64),
    }
    if features.reference_benign is not None and features.reference_poisoned is not None:
        arrays["reference_benign"] = np.asarray(features.reference_benign, FEATURE_DTYPE)
        arrays["reference_poisoned"] = np.asarray(features.reference_poisoned, FEATURE_DTYPE)
    atomic_write_npz(arrays, path)


def load_features(path: Path) -> CellFeatures | None:
    """The features saved at ``path``; None when the file is missing, unreadable or malformed."""
    arrays = read_npz(path)
    if arrays is None:
        return None
    try:
        target, per_class, poisoned_per_class = (int(v) for v in arrays["settings"])
        features = CellFeatures(
            benign=arrays["benign"], poisoned=arrays["poisoned"], benign_labels=arrays["benign_labels"],
            poisoned_labels=arrays["poisoned_labels"], classes=[str(c) for c in arrays["classes"]], target=target,
            per_class=per_class, poisoned_per_class=poisoned_per_class,
            reference_benign=arrays.get("reference_benign"), reference_poisoned=arrays.get("reference_poisoned"),
        )  # fmt: skip
    except (KeyError, ValueError):
        return None
    shapes_ok = (
        features.benign.ndim == features.poisoned.ndim == 2
        and features.benign.shape[0] == features.benign_labels.shape[0]
        and features.poisoned.shape[0] == features.poisoned_labels.shape[0]
        and (features.reference_benign is None or features.reference_benign.shape[0] == features.benign.shape[0])
    )  # fmt: skip
    return features if shapes_ok else None
