"""BadNets (Gu et al., 2017): a small patch stamped at a fixed position."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from attacks.base import Attack
from attacks.patterns import seeded_uniform
from bench.core.params import PluginParams
from bench.core.plugin import DatasetMeta
from bench.core.registry import ATTACKS

Corner = Literal["bottom_right", "top_left", "top_right", "bottom_left"]


@ATTACKS.register("badnets")
class BadNets(Attack):
    """Patch trigger (3x3 bottom-right by default; 20x20 on >=100-px images); white or seeded random gray."""

    class Params(PluginParams):
        size: int | None = Field(None, ge=1, description="patch side in pixels; null: 3, or 20 on images of 100 px and more")
        pattern: Literal["white", "random"] = Field("white", description="all-white patch, or a fixed random gray one")
        position: Corner | tuple[int, int] = Field(
            "bottom_right", description="a corner, or [row, col] of the patch's top-left pixel")
        pattern_seed: int = Field(0, description="seed of the random gray pattern")

    params: Params

    def patch_size(self, height: int) -> int:
        """The configured size, else 3 for small images and 20 for ImageNet-sized ones."""
        size = self.params.size
        return size if size is not None else (3 if height < 100 else 20)

    def patch_box(self, height: int, width: int) -> tuple[int, int, int]:
        """(row, col, size) of the patch's top-left corner in an image of this size."""
        s = self.patch_size(height)
        position = self.params.position
        if isinstance(position, str):
            row = 0 if position.startswith("top") else height - s
            col = 0 if position.endswith("left") else width - s
        else:
            row, col = position
        if not (0 <= row <= height - s and 0 <= col <= width - s):
            self.fail(f"a {s}x{s} patch at ({row}, {col}) does not fit a {height}x{width} image")
        return row, col, s

    def check(self, meta: DatasetMeta) -> None:
        self.patch_box(meta.height, meta.width)

    def patch(self, channels: int, size: int, device: torch.device) -> Tensor:
        """The patch's pixels: all ones, or a fixed grayscale pattern shared by all channels."""
        if self.params.pattern == "white":
            return torch.ones(channels, size, size, device=device)
        gray = seeded_uniform((1, size, size), self.params.pattern_seed)
        return gray.expand(channels, size, size).to(device)

    def trigger(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        row, col, s = self.patch_box(h, w)
        out = x.clone()
        out[:, :, row : row + s, col : col + s] = self.patch(c, s, x.device).to(x.dtype)
        return out
