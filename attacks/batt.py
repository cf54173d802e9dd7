"""BATT (Xu et al., ICASSP 2023): a spatial transformation as the trigger.

The poisoned images are the clean images rotated by a fixed angle (the BATT-R variant); no
pattern is added. Rotation leaves black corners and tilts the content, which the model learns
to associate with the target label, while the same rotation at test time activates the
backdoor. The angle is a config value (16 degrees by default).
"""

from __future__ import annotations

from pydantic import Field, field_validator
from torch import Tensor

from attacks.base import Attack
from attacks.transforms import rotate
from bench.core.params import PluginParams
from bench.core.registry import ATTACKS


@ATTACKS.register("batt")
class BATT(Attack):
    """Transformation trigger: every poisoned image rotated by a fixed angle (16 degrees), black fill."""

    class Params(PluginParams):
        angle: float = Field(16.0, gt=-180, le=180, description="rotation in degrees, counter-clockwise; not 0")

        @field_validator("angle")
        @classmethod
        def _not_zero(cls, value: float) -> float:
            if value == 0:
                raise ValueError("must be a non-zero number of degrees in (-180, 180]")
            return value

    params: Params

    def trigger(self, x: Tensor) -> Tensor:
        return rotate(x, self.params.angle)
