"""BadNets (Gu et al., 2017): a small patch stamped at a fixed position.

The patch is white (the classic variant), a fixed random grayscale square drawn from
``pattern_seed``, or explicit uint8 pixel values given in the config -- the REFINE code's
CIFAR-10 trigger is the gray 3x3 square [[247, 241, 130], [106, 201, 92], [153, 163, 20]] on
every channel, in the bottom-right corner (its BadNets, PhysicalBA and Label-Consistent attacks
share it). :class:`PatchParams` and :class:`PatchTrigger` are the patch's parameters and stamping,
for every attack that stamps it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NoReturn

import torch
from pydantic import Field, model_validator
from torch import Tensor

from attacks.base import Attack
from attacks.patterns import PatchPattern, explicit_pixels, patch_pixels
from bench.core.params import PluginParams
from bench.core.plugin import DatasetMeta
from bench.core.registry import ATTACKS

Corner = Literal["bottom_right", "top_left", "top_right", "bottom_left"]


class PatchParams(PluginParams):
    """Where the patch goes and what it looks like."""

    size: int | None = Field(None, ge=1, description="patch side in pixels; null: 3, or 20 on images of 100 px and more "
                                                     "(an explicit pattern: its side)")  # fmt: skip
    pattern: PatchPattern = Field(
        "white", description="'white', 'random' (a fixed random gray square), or uint8 pixel values: a square "
                             "[[r0c0, r0c1, ...], ...] used on every channel, or one square per channel")  # fmt: skip
    position: Corner | tuple[int, int] = Field(
        "bottom_right", description="a corner, or [row, col] of the patch's top-left pixel")
    pattern_seed: int = Field(0, description="seed of the random gray pattern")

    @model_validator(mode="after")
    def _pattern_fits_size(self) -> PatchParams:
        try:
            values = explicit_pixels(self.pattern)
        except ValueError as err:
            raise ValueError(f"pattern {err}") from None
        if values is not None and self.size is not None and self.size != values.shape[-1]:
            raise ValueError(f"size {self.size} differs from the side of the given pattern ({values.shape[-1]}); "
                             "leave size out or make them agree")  # fmt: skip
        return self


class PatchTrigger:
    """Stamping of a :class:`PatchParams` patch; mixed into attacks that carry ``params: PatchParams``."""

    params: PatchParams
    fail: Callable[[str], NoReturn]  # from Plugin

    def patch_size(self, height: int) -> int:
        """The side of an explicit pattern, else the configured size, else 3 for small images and 20
        for ImageNet-sized ones."""
        values = explicit_pixels(self.params.pattern)
        if values is not None:
            return int(values.shape[-1])
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

    def check_patch(self, meta: DatasetMeta) -> None:
        """The patch fits the images, and a per-channel pattern has one square per channel."""
        self.patch_box(meta.height, meta.width)
        values = explicit_pixels(self.params.pattern)
        if values is not None and values.shape[0] not in (1, meta.channels):
            self.fail(f"the pattern has {values.shape[0]} channel squares but {meta.name!r} images have "
                      f"{meta.channels} channel{'s' if meta.channels > 1 else ''}")  # fmt: skip

    def patch(self, channels: int, size: int, device: torch.device) -> Tensor:
        """The patch's pixels (channels, size, size) in [0, 1]."""
        return patch_pixels(self.params.pattern, channels, size, self.params.pattern_seed).to(device)

    def stamp_patch(self, x: Tensor) -> Tensor:
        """A copy of float images ``x`` (N, C, H, W) with the patch's pixels in its box."""
        _, c, h, w = x.shape
        row, col, s = self.patch_box(h, w)
        values = explicit_pixels(self.params.pattern)
        if values is not None and values.shape[0] not in (1, c):
            self.fail(f"the pattern has {values.shape[0]} channel squares but the images have {c} channels")
        out = x.clone()
        out[:, :, row : row + s, col : col + s] = self.patch(c, s, x.device).to(x.dtype)
        return out


@ATTACKS.register("badnets")
class BadNets(PatchTrigger, Attack):
    """Patch trigger (3x3 bottom-right by default; 20x20 on >=100-px images): white, seeded gray, or given pixels."""

    Params = PatchParams
    params: PatchParams

    def check(self, meta: DatasetMeta) -> None:
        self.check_patch(meta)

    def trigger(self, x: Tensor) -> Tensor:
        return self.stamp_patch(x)
