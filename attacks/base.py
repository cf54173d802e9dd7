"""The attack contract: batched triggers and all-to-one training-set poisoning.

A subclass implements :meth:`Attack.trigger` on float images in [0, 1] for a whole batch; the
base class handles uint8 conversion, choosing which training samples to poison, relabelling
them, and building the ASR test set (target-class samples removed). Attacks with state (a WaNet
warping field, clean-label perturbations) draw it in :meth:`fit`.

Parameters are declared once in a nested ``Params`` model (see :mod:`bench.core.plugin`); the
attack reads them from ``self.params``. Checks that need the dataset's image size go in
:meth:`~bench.core.plugin.Plugin.check`, which every grid calls before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from bench.core.data import ImageSet
from bench.core.device import to_float, to_uint8
from bench.core.errors import BenchError
from bench.core.plugin import Plugin


@dataclass
class PoisonedSet:
    """A training set after poisoning, and which of its samples carry the trigger."""

    train: ImageSet
    poisoned_index: Tensor  # indices of samples that carry the trigger and the attacker's label
    # Samples the attack modified but left with their true label (Adaptive-Patch's cover
    # samples, WaNet's noise-mode samples): a defense must not be told these are clean.
    cover_index: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))


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
        """Extra train-time transformation of every batch (PhysicalBA's physical transforms)."""
        return x

    def poisoning_rate(self, rate: float) -> float:
        """The share of the training set this attack poisons: the attack's own ``poison_rate``
        parameter when it has one and it is set (Adaptive-Patch's 1%), else the grid's rate."""
        own = getattr(self.params, "poison_rate", None)
        return rate if own is None else float(own)

    def select_poison_index(self, train: ImageSet, rate: float, target: int, gen: torch.Generator) -> Tensor:
        """Exactly ``round(poisoning_rate(rate) * N)`` indices, drawn without replacement from the
        non-target samples (from the target class for clean-label attacks)."""
        rate = self.poisoning_rate(rate)
        count = round(rate * len(train))
        pool = train.y == target if self.clean_label else train.y != target
        candidates = torch.nonzero(pool).flatten()
        if count > candidates.numel():
            where = "in" if self.clean_label else "outside"
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

    def poison_train(self, train: ImageSet, rate: float, target: int, gen: torch.Generator) -> PoisonedSet:
        """All-to-one poisoning: the chosen samples get the trigger and the target label."""
        index = self.select_poison_index(train, rate, target, gen)
        x, y = train.x.clone(), train.y.clone()
        if index.numel():
            x[index] = self.apply(train.x[index])
            y[index] = target
        return PoisonedSet(ImageSet(x, y, train.classes), index)

    def poison_test(self, test: ImageSet, target: int) -> tuple[Tensor, Tensor]:
        """Triggered test images with their true labels, target-class samples removed."""
        keep = test.y != target
        return self.apply(test.x[keep]), test.y[keep]
