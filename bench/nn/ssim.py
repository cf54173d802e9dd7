"""Structural similarity (Wang et al., 2004) as a per-pixel map, batched."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.core.device import full_precision


def gaussian_window(size: int = 11, sigma: float = 1.5, device: torch.device | None = None) -> Tensor:
    """A normalised (size, size) Gaussian kernel."""
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """SSIM of every pixel, averaged over channels: (N, C, H, W) x 2 -> (N, H, W).

    Local statistics use a Gaussian window (11x11, sigma 1.5, the usual setting) over
    replicate-padded images, so the map has the input's size and a border (where patch triggers
    sit) is not compared against artificial zeros; constants C1 = (0.01 L)^2, C2 = (0.03 L)^2.
    Computed in fp32 even under autocast: the variances are differences of nearly equal means.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim_map needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 in, fp32 statistics; fp64 stays fp64
    with full_precision(x):
        return _ssim_map(x.to(dtype), y.to(dtype), window, sigma, data_range)


def _ssim_map(x: Tensor, y: Tensor, window: int, sigma: float, data_range: float) -> Tensor:
    c = x.shape[1]
    kernel = gaussian_window(window, sigma, x.device).to(x.dtype).expand(c, 1, window, window)

    pad = window // 2

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(F.pad(z, (pad, pad, pad, pad), mode="replicate"), kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim.mean(1)
