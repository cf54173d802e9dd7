"""Batched affine image transforms with per-image parameters, for transformation-based attacks.

PhysicalBA trains on randomly rotated, shifted and scaled images; BATT's trigger is a fixed
rotation. Both are one ``affine_grid`` + ``grid_sample`` over the whole batch, with parameters
in the conventions of ``torchvision.transforms.RandomAffine``: angles in degrees, positive =
counter-clockwise; translations as fractions of the image size; scaling about the centre;
uncovered pixels filled with black. Resampling is nearest-neighbour by default, as in the
reference code (``RandomAffine``'s default interpolation, PIL's ``Image.rotate`` default), so a
transformed image holds only pixel values of its source (and black); ``random_affine`` shifts by
whole pixels, as ``RandomAffine`` rounds its drawn translation to integers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def affine_theta(angle: Tensor, translate: Tensor, scale: Tensor, height: int, width: int) -> Tensor:
    """``affine_grid`` matrices (N, 2, 3) that rotate by ``angle`` degrees, shift by ``translate``
    (N, 2: fractions of width and height) and scale by ``scale`` about the image centre.

    ``affine_grid`` asks, for each output pixel, where to read in the input, so this is the
    inverse map, written in pixel units and conjugated into the [-1, 1] coordinates of
    ``grid_sample`` (which differ per axis on non-square images).
    """
    rad = angle * (math.pi / 180)
    cos, sin = torch.cos(rad) / scale, torch.sin(rad) / scale
    aspect = height / width
    theta = torch.empty(angle.shape[0], 2, 3, dtype=angle.dtype, device=angle.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * aspect
    theta[:, 1, 0], theta[:, 1, 1] = sin / aspect, cos
    shift = 2 * translate  # fractions of the size -> normalised units
    theta[:, :, 2] = -(theta[:, :, :2] @ shift.unsqueeze(-1)).squeeze(-1)
    return theta


def warp_affine(x: Tensor, theta: Tensor, mode: str = "nearest") -> Tensor:
    """Resample every image of ``x`` through its own affine matrix; outside pixels are black."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def rotate(x: Tensor, angle: float | Tensor, mode: str = "nearest") -> Tensor:
    """Rotate every image by ``angle`` degrees (counter-clockwise) about its centre: one angle for
    the whole batch, or a tensor of one angle per image."""
    n, _, h, w = x.shape
    angles = torch.as_tensor(angle, dtype=x.dtype, device=x.device).expand(n)
    zeros = torch.zeros(n, 2, dtype=x.dtype, device=x.device)
    return warp_affine(x, affine_theta(angles, zeros, torch.ones_like(angles), h, w), mode)


def _uniform(n: int, low: float, high: float, gen: torch.Generator, like: Tensor) -> Tensor:
    return torch.rand(n, generator=gen, device=like.device, dtype=like.dtype) * (high - low) + low


def random_affine(
    x: Tensor, gen: torch.Generator, degrees: float, translate: float, scale: tuple[float, float]
) -> Tensor:
    """A random rotation in [-degrees, degrees], shift and scale in ``scale``, drawn per image and
    resampled nearest-neighbour, as ``RandomAffine``: the shift along each axis is drawn from
    [-translate, translate] times that side and rounded to whole pixels (half to even)."""
    n, _, h, w = x.shape
    angle = _uniform(n, -degrees, degrees, gen, x)
    dx = _uniform(n, -translate * w, translate * w, gen, x).round() / w
    dy = _uniform(n, -translate * h, translate * h, gen, x).round() / h
    factor = _uniform(n, scale[0], scale[1], gen, x)
    return warp_affine(x, affine_theta(angle, torch.stack([dx, dy], 1), factor, h, w))


def random_brightness(x: Tensor, gen: torch.Generator, strength: float) -> Tensor:
    """Multiply each image by a factor drawn from [1 - strength, 1 + strength] (ColorJitter's brightness)."""
    factor = _uniform(x.shape[0], max(0.0, 1 - strength), 1 + strength, gen, x)
    return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)
