"""Batched, per-sample random image transforms.

torchvision's random transforms draw one parameter set per call; applied to a batch they would
move every image the same way. These functions draw parameters per image and apply them with a
single gather or ``grid_sample``, so a whole batch is augmented in a few tensor operations.
All take float images (N, C, H, W) and a ``torch.Generator`` on the images' device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def shift_images(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Translate image ``i`` by (``dy[i]``, ``dx[i]``) whole pixels, filling with zeros."""
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device)[None, :] - dy[:, None]
    cols = torch.arange(w, device=x.device)[None, :] - dx[:, None]
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    flat = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    out = x.reshape(n, c, h * w).gather(2, flat.reshape(n, 1, h * w).expand(n, c, h * w))
    return torch.where(valid[:, None], out.view(n, c, h, w), torch.zeros((), dtype=x.dtype, device=x.device))


def random_crop(x: Tensor, padding: int, gen: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` and crop back at a random offset (per image)."""
    if padding <= 0:
        return x
    n = x.shape[0]
    dy = torch.randint(-padding, padding + 1, (n,), generator=gen, device=x.device)
    dx = torch.randint(-padding, padding + 1, (n,), generator=gen, device=x.device)
    return shift_images(x, dy, dx)


def random_flip(x: Tensor, gen: torch.Generator, p: float = 0.5) -> Tensor:
    """Horizontal flip of each image with probability ``p``."""
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def crop_and_flip(x: Tensor, gen: torch.Generator, padding: int, flip: bool) -> Tensor:
    """The standard classifier augmentation: :func:`random_crop` with zero padding, then (if
    ``flip``) :func:`random_flip`, per image."""
    x = random_crop(x, padding, gen)
    return random_flip(x, gen) if flip else x


def random_grayscale(x: Tensor, gen: torch.Generator, p: float = 0.2) -> Tensor:
    """Replace each RGB image by its luminance (kept 3-channel) with probability ``p``."""
    if x.shape[1] != 3:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    gray = (x * weights).sum(1, keepdim=True).expand_as(x)
    pick = torch.rand(x.shape[0], generator=gen, device=x.device) < p
    return torch.where(pick[:, None, None, None], gray, x)


def random_resized_crop(
    x: Tensor,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize back (bilinear)."""
    n = x.shape[0]
    dev = x.device
    area = torch.empty(n, device=dev).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(n, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    aspect = log_r.exp()
    # Box side lengths as fractions of the image (width, height), clipped to fit.
    sw = (area * aspect).sqrt().clamp(max=1.0)
    sh = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=gen, device=dev) * 2 - 1) * (1 - sw)
    cy = (torch.rand(n, generator=gen, device=dev) * 2 - 1) * (1 - sh)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sw, cx
    theta[:, 1, 1], theta[:, 1, 2] = sh, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
