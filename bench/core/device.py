"""Device selection (``auto`` means the first CUDA device when there is one, else the CPU) and
the precision policy every training loop and evaluation shares.

bf16 autocast is on by default on CUDA, where tensor cores run bf16 several times faster than
fp32 and bf16's fp32-sized exponent needs no loss scaling; on the CPU it is off by default (fp32,
so CPU numbers stay those of the plain fp32 code) and can be asked for separately, since only
some CPUs (AVX-512 BF16, AMX) gain from it.
"""

from __future__ import annotations

import torch

from bench.core.errors import BenchError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(spec))
    except RuntimeError:
        raise BenchError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device {spec!r} requested but CUDA is not available on this machine")
    return device


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; float images pass through."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float images in [0, 1] -> uint8 with rounding (the inverse of :func:`to_float`)."""
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def autocast(device: torch.device, cuda_bf16: bool = True, cpu_bf16: bool = False) -> torch.autocast:
    """bf16 autocast on ``device`` when asked for its type (``cuda_bf16`` on CUDA, ``cpu_bf16`` on
    the CPU); a disabled, cost-free context otherwise."""
    enabled = cuda_bf16 if device.type == "cuda" else cpu_bf16 and device.type == "cpu"
    return torch.autocast("cuda" if device.type == "cuda" else "cpu", dtype=torch.bfloat16, enabled=enabled)


def full_precision(x: torch.Tensor) -> torch.autocast:
    """A region where autocast is off on ``x``'s device: for losses and statistics that lose too
    much in bf16 (a contrastive similarity matrix at temperature 0.07, SSIM's variance as a
    difference of means) or that autocast refuses (binary cross-entropy on CUDA)."""
    return torch.autocast("cuda" if x.device.type == "cuda" else "cpu", enabled=False)
