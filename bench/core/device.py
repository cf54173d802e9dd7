"""Device selection: ``auto`` means the first CUDA device when there is one, else the CPU."""

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
