"""BATT (Xu et al., ICASSP 2023): a spatial transformation as the trigger.

The poisoned images are the clean images rotated by a fixed angle (the BATT-R variant); no
pattern is added. Rotation leaves black corners and tilts the content, which the model learns
to associate with the target label, while the same rotation at test time activates the
backdoor. The angle is a config value (16 degrees by default).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attacks.base import Attack
from attacks.transforms import rotate
from bench.core.errors import BenchError
from bench.core.registry import ATTACKS


@ATTACKS.register("batt")
class BATT(Attack):
    """Transformation trigger: every poisoned image rotated by a fixed angle (16 degrees), black fill."""

    def __init__(self, angle: float = 16.0, **params: Any) -> None:
        super().__init__(**params)
        if not -180 < angle <= 180 or angle == 0:
            raise BenchError(f"batt: angle must be a non-zero number of degrees in (-180, 180], got {angle}")
        self.angle = float(angle)

    def trigger(self, x: Tensor) -> Tensor:
        return rotate(x, self.angle)
