"""Trigger images drawn from a seed or read from a file, so that nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bench.core.errors import BenchError


def seeded_uniform(shape: tuple[int, ...], seed: int) -> Tensor:
    """A fixed random image in [0, 1] of ``shape`` (same seed, same image, on every machine)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


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
