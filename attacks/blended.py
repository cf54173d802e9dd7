"""Blended (Chen et al., 2017): a fixed image alpha-blended over the whole input."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from torch import Tensor

from attacks.base import Attack
from attacks.patterns import load_image, seeded_uniform
from bench.core.params import PluginParams
from bench.core.registry import ATTACKS


@ATTACKS.register("blended")
class Blended(Attack):
    """(1 - alpha) * x + alpha * blend image; alpha 0.1, a seeded noise image or an image file."""

    class Params(PluginParams):
        alpha: float = Field(0.1, gt=0, le=1, description="opacity of the blended image")
        pattern: str = Field("noise", description="'noise' (a seeded uniform noise image) or the path of an image file")
        pattern_seed: int = Field(0, description="seed of the noise image")

        @field_validator("pattern")
        @classmethod
        def _image_exists(cls, value: str) -> str:
            if value != "noise" and not Path(value).expanduser().is_file():
                raise ValueError("must be 'noise' or an existing image file")
            return value

    params: Params

    def __init__(self, params: PluginParams | Mapping[str, Any] | None = None, **raw: Any) -> None:
        super().__init__(params, **raw)
        self._blend_cache: dict[tuple[int, int, int], Tensor] = {}

    def blend_image(self, channels: int, height: int, width: int) -> Tensor:
        if self.params.pattern == "noise":
            return seeded_uniform((channels, height, width), self.params.pattern_seed)
        return load_image(self.params.pattern, channels, (height, width))

    def trigger(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        key = (c, h, w)
        if key not in self._blend_cache:
            self._blend_cache[key] = self.blend_image(c, h, w)
        image = self._blend_cache[key].to(device=x.device, dtype=x.dtype)
        return (1 - self.params.alpha) * x + self.params.alpha * image
