"""The attack contract: batched triggers and all-to-one training-set poisoning.

A subclass implements :meth:`Attack.trigger` on float images in [0, 1] for a whole batch; the
base class handles uint8 conversion, choosing which training samples to poison, relabelling
them, and building the ASR test set (target-class samples removed). Attacks with state (a WaNet
warping field, clean-label perturbations) draw it in :meth:`fit`.

Poisoned samples are drawn from the non-target classes (``pool="non_target"``, the default) or,
as BackdoorBox and the REFINE code do, from all classes (``pool="all"``: a drawn target-class
sample gets the trigger and keeps its label). Clean-label attacks draw from the target class.

Training sees the poisoned set through :meth:`Attack.batch_augment`, once per batch: by default
the standard augmentation, then :meth:`Attack.train_augment` (PhysicalBA's physical
transformations). Attacks whose training-time trigger depends on the epoch or on the
augmentation (WaNet's noise mode, BATT's rotation after the flip) override it; they find the
batch's poisoned or cover samples and their clean originals with :class:`SampleSource`.

Parameters are declared once in a nested ``Params`` model (see :mod:`bench.core.plugin`); the
attack reads them from ``self.params``. Checks that need the dataset's image size go in
:meth:`~bench.core.plugin.Plugin.check`, which every grid calls before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from bench.core.data import ImageSet
from bench.core.device import to_float, to_uint8
from bench.core.errors import BenchError
from bench.core.plugin import Plugin
from bench.nn.train import BatchTransform, IndexedTransform

# Where all-to-one attacks draw their poisoned samples: outside the target class, or anywhere.
PoisonPool = Literal["non_target", "all"]


@dataclass
class PoisonedSet:
    """A training set after poisoning, and which of its samples carry the trigger."""

    train: ImageSet
    poisoned_index: Tensor  # indices of samples that carry the trigger and the attacker's label
    # Samples the attack modified but left with their true label (Adaptive-Patch's cover
    # samples, WaNet's noise-mode samples): a defense must not be told these are clean.
    cover_index: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))


class SampleSource:
    """The clean originals of some training samples (``members``), looked up by the dataset
    indices of a training batch -- for attacks that re-trigger those samples in every batch.

    The lookup runs on the batch's device without synchronising with the host: rows of the batch
    that are not members keep their image.
    """

    def __init__(self, train: ImageSet, members: Tensor) -> None:
        self.members = members
        self.images = train.x[members]
        self._row = torch.full((len(train),), -1, dtype=torch.int64)
        self._row[members] = torch.arange(members.numel())
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return self.members.numel()

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._on:
            self._on[device] = (self._row.to(device), self.images.to(device))
        return self._on[device]

    def swap_in(self, x: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """(``x`` with the members' rows replaced by their clean originals as float, the (N,)
        boolean mask of those rows); ``index`` holds the dataset indices of ``x``'s rows."""
        row, images = self._tables(x.device)
        rows = row[index]
        hit = rows >= 0
        if not len(self):
            return x, hit
        originals = to_float(images[rows.clamp(min=0)]).to(x.dtype)
        return torch.where(hit[:, None, None, None], originals, x), hit


@dataclass
class FitContext:
    """What an attack may need beyond the data: e.g. a clean model for clean-label attacks."""

    device: torch.device
    train_clean_model: Callable[[], nn.Module] | None = None


class Attack(Plugin):
    """Base class of all attacks. Parameters come from the config, validated by ``Params``."""

    # Clean-label attacks poison target-class samples and keep every label (Label-Consistent);
    # the others relabel non-target samples to the target (all-to-one).
    clean_label: ClassVar[bool] = False

    # ------------------------------------------------------------------ to implement
    def trigger(self, x: Tensor) -> Tensor:
        """Stamp the trigger on float images in [0, 1] (N, C, H, W); return the same shape."""
        raise NotImplementedError

    def fit(self, train: ImageSet, gen: torch.Generator, ctx: FitContext | None = None) -> None:
        """Draw or learn the attack's state from the training set; stateless attacks skip it."""

    # ------------------------------------------------------------------ provided
    def apply(self, x: Tensor) -> Tensor:
        """The trigger on a batch of uint8 or float images; output has the input's dtype."""
        out = self.trigger(to_float(x)).clamp(0, 1)
        return to_uint8(out) if x.dtype == torch.uint8 else out

    def train_augment(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Extra train-time transformation of every augmented batch, whatever its samples
        (PhysicalBA's physical transforms); the identity by default."""
        return x

    def batch_augment(self, clean: ImageSet, poisoned: PoisonedSet, standard: BatchTransform) -> IndexedTransform:
        """The transformation ``(x, index, gen) -> x`` of every training batch of ``poisoned.train``
        (float images ``x`` with their dataset indices ``index``): the ``standard`` augmentation
        (crop, flip), then :meth:`train_augment`. ``clean`` is the training set before poisoning,
        for attacks that re-trigger their samples per batch."""

        def apply(x: Tensor, index: Tensor, gen: torch.Generator) -> Tensor:
            return self.train_augment(standard(x, gen), gen)

        return apply

    def poisoning_rate(self, rate: float) -> float:
        """The share of the training set this attack poisons: the attack's own ``poison_rate``
        parameter when it has one and it is set (Adaptive-Patch's 1%), else the grid's rate."""
        own = getattr(self.params, "poison_rate", None)
        return rate if own is None else float(own)

    def select_poison_index(
        self, train: ImageSet, rate: float, target: int, gen: torch.Generator, pool: PoisonPool = "non_target"
    ) -> Tensor:
        """Indices drawn without replacement: ``round(poisoning_rate(rate) * N)`` of the non-target
        samples (``pool="non_target"``) or of all samples (``pool="all"``); for clean-label
        attacks ``round(poisoning_rate(rate) * n_target)`` of the target class, whatever ``pool``."""
        rate = self.poisoning_rate(rate)
        if self.clean_label:
            candidates = torch.nonzero(train.y == target).flatten()
            count, where = round(rate * candidates.numel()), "in"
        else:
            mask = torch.ones_like(train.y, dtype=torch.bool) if pool == "all" else train.y != target
            candidates = torch.nonzero(mask).flatten()
            count, where = round(rate * len(train)), "outside"
        if count > candidates.numel():
            raise BenchError(
                f"poisoning rate {rate} asks for {count} samples but only {candidates.numel()} are {where} the target class"
            )
        pick = torch.randperm(candidates.numel(), generator=gen)[:count]
        return torch.sort(candidates[pick]).values

    def select_cover_index(self, train: ImageSet, count: int, exclude: Tensor, gen: torch.Generator) -> Tensor:
        """``count`` indices of any class outside ``exclude`` (the poisoned ones), without replacement."""
        free = torch.ones(len(train), dtype=torch.bool)
        free[exclude] = False
        candidates = torch.nonzero(free).flatten()
        if count > candidates.numel():
            raise BenchError(f"attack {self.name!r} asks for {count} cover samples but only {candidates.numel()} are left")
        pick = torch.randperm(candidates.numel(), generator=gen)[:count]
        return torch.sort(candidates[pick]).values

    def poison_train(
        self, train: ImageSet, rate: float, target: int, gen: torch.Generator, pool: PoisonPool = "non_target"
    ) -> PoisonedSet:
        """All-to-one poisoning: the chosen samples (see :meth:`select_poison_index`) get the
        trigger and the target label."""
        index = self.select_poison_index(train, rate, target, gen, pool)
        x, y = train.x.clone(), train.y.clone()
        if index.numel():
            x[index] = self.apply(train.x[index])
            y[index] = target
        return PoisonedSet(ImageSet(x, y, train.classes), index)

    def poison_test(self, test: ImageSet, target: int) -> tuple[Tensor, Tensor]:
        """Triggered test images with their true labels, target-class samples removed."""
        keep = test.y != target
        return self.apply(test.x[keep]), test.y[keep]
