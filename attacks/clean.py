"""The no-attack reference: a model trained with the same recipe on unpoisoned data.

``clean`` poisons nothing and its "trigger" is the identity, so its row in a table gives the
clean model's BA (the yardstick for every attack's BA drop) and, as ASR, the share of clean
non-target test images the model labels as the target anyway (the floor an ASR is read against).
"""

from __future__ import annotations

from torch import Tensor

from attacks.base import Attack
from bench.core.registry import ATTACKS


@ATTACKS.register("clean")
class Clean(Attack):
    """No backdoor (reference row): nothing poisoned, identity trigger; ASR = chance of predicting the target."""

    def poisoning_rate(self, rate: float) -> float:
        return 0.0

    def trigger(self, x: Tensor) -> Tensor:
        return x.clone()
