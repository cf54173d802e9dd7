"""Blended (Chen et al., 2017): a fixed image alpha-blended over the whole input."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attacks.base import Attack
from attacks.patterns import load_image, seeded_uniform
from bench.core.errors import BenchError
from bench.core.registry import ATTACKS


@ATTACKS.register("blended")
class Blended(Attack):
    """(1 - alpha) * x + alpha * blend image; alpha 0.1, a seeded noise image or an image file."""

    def __init__(self, alpha: float = 0.1, pattern: str = "noise", pattern_seed: int = 0, **params: Any) -> None:
        super().__init__(**params)
        if not 0 < alpha <= 1:
            raise BenchError(f"blended: alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.pattern = pattern  # "noise" or a path to an image file
        self.pattern_seed = pattern_seed
        self._blend_cache: dict[tuple[int, int, int], Tensor] = {}

    def blend_image(self, channels: int, height: int, width: int) -> Tensor:
        if self.pattern == "noise":
            return seeded_uniform((channels, height, width), self.pattern_seed)
        return load_image(self.pattern, channels, (height, width))

    def trigger(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        key = (c, h, w)
        if key not in self._blend_cache:
            self._blend_cache[key] = self.blend_image(c, h, w)
        image = self._blend_cache[key].to(device=x.device, dtype=x.dtype)
        return (1 - self.alpha) * x + self.alpha * image
