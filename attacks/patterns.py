"""Trigger images drawn from a seed, given as pixel values, or read from a file: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from bench.core.errors import BenchError

# A patch pattern in a config: a named kind, or explicit uint8 pixel values -- rows of a square
# (the same values on every channel) or one such square per channel.
PixelValue = Annotated[int, Field(ge=0, le=255)]
PatchPattern = Literal["white", "random"] | list[list[PixelValue]] | list[list[list[PixelValue]]]


def seeded_uniform(shape: tuple[int, ...], seed: int) -> Tensor:
    """A fixed random image in [0, 1] of ``shape`` (same seed, same image, on every machine)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def explicit_pixels(pattern: PatchPattern) -> Tensor | None:
    """An explicit pattern as a uint8 tensor (C, s, s) -- C is 1 for a pattern shared by all
    channels -- or None for a named one. Raises ``ValueError`` unless the values form squares of
    one size (the message completes "pattern must ...")."""
    if isinstance(pattern, str):
        return None
    per_channel = bool(pattern) and bool(pattern[0]) and isinstance(pattern[0][0], list)
    squares = pattern if per_channel else [pattern]
    side = len(squares[0]) if squares else 0
    if not side or not all(len(square) == side and all(len(row) == side for row in square) for square in squares):
        raise ValueError("must be a square of pixel values (rows of equal length, as many rows as columns), "
                         "or one such square per channel, all of one size")  # fmt: skip
    return torch.tensor(squares, dtype=torch.uint8)


def patch_pixels(pattern: PatchPattern, channels: int, size: int, seed: int) -> Tensor:
    """The pixels (channels, size, size) in [0, 1] of a patch pattern: all white, a fixed random
    grayscale square drawn from ``seed``, or the explicit values (a one-channel square is copied
    to every channel)."""
    values = explicit_pixels(pattern)
    if values is not None:
        return (values.float() / 255).expand(channels, size, size).clone()
    if pattern == "white":
        return torch.ones(channels, size, size)
    return seeded_uniform((1, size, size), seed).expand(channels, size, size).clone()


def load_image(path: str | Path, channels: int, size: tuple[int, int]) -> Tensor:
    """Read an image file as float (channels, H, W) in [0, 1], resized to ``size``."""
    from PIL import Image

    file = Path(path).expanduser()
    if not file.is_file():
        raise BenchError(f"trigger image {file} does not exist")
    with Image.open(file) as img:
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
    t = torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1)).permute(2, 0, 1)
    return F.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
