"""BadNets (Gu et al., 2017): a small patch stamped at a fixed position."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attacks.base import Attack
from attacks.patterns import seeded_uniform
from bench.core.errors import BenchError
from bench.core.registry import ATTACKS


@ATTACKS.register("badnets")
class BadNets(Attack):
    """Patch trigger (3x3 bottom-right by default; 20x20 on >=100-px images); white or seeded random gray."""

    def __init__(
        self,
        size: int | None = None,
        pattern: str = "white",
        position: str | list[int] = "bottom_right",
        pattern_seed: int = 0,
        **params: Any,
    ) -> None:
        super().__init__(**params)
        if size is not None and size < 1:
            raise BenchError(f"badnets: size must be >= 1, got {size}")
        if pattern not in ("white", "random"):
            raise BenchError(f"badnets: pattern must be 'white' or 'random', got {pattern!r}")
        if isinstance(position, str) and position not in ("bottom_right", "top_left", "top_right", "bottom_left"):
            raise BenchError(f"badnets: position must be a corner name or [row, col], got {position!r}")
        self.size = size
        self.pattern = pattern
        self.position = position
        self.pattern_seed = pattern_seed

    def patch_size(self, height: int) -> int:
        """The configured size, else 3 for small images and 20 for ImageNet-sized ones."""
        return self.size if self.size is not None else (3 if height < 100 else 20)

    def patch_box(self, height: int, width: int) -> tuple[int, int, int]:
        """(row, col, size) of the patch's top-left corner in an image of this size."""
        s = self.patch_size(height)
        if isinstance(self.position, str):
            row = 0 if self.position.startswith("top") else height - s
            col = 0 if self.position.endswith("left") else width - s
        else:
            row, col = int(self.position[0]), int(self.position[1])
        if not (0 <= row <= height - s and 0 <= col <= width - s):
            raise BenchError(f"badnets: a {s}x{s} patch at ({row}, {col}) does not fit a {height}x{width} image")
        return row, col, s

    def patch(self, channels: int, size: int, device: torch.device) -> Tensor:
        """The patch's pixels: all ones, or a fixed grayscale pattern shared by all channels."""
        if self.pattern == "white":
            return torch.ones(channels, size, size, device=device)
        gray = seeded_uniform((1, size, size), self.pattern_seed)
        return gray.expand(channels, size, size).to(device)

    def trigger(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        row, col, s = self.patch_box(h, w)
        out = x.clone()
        out[:, :, row : row + s, col : col + s] = self.patch(c, s, x.device).to(x.dtype)
        return out
