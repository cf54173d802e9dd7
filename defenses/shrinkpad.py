"""ShrinkPad (Li et al., 2021, "Backdoor Attack in the Physical World"): shrink, then pad back.

The image is resized down by ``pad`` pixels per side length and zero-padded back to its size at
a random offset, drawn per image. Small spatial shifts break triggers that rely on an exact
location; ``pad`` is the intensity knob of the trade-off curve.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from bench.core.params import PluginParams
from bench.core.plugin import DatasetMeta
from bench.core.registry import DEFENSES
from bench.core.seeding import generator
from bench.nn.augment import shift_images
from defenses.base import Defense, DefenseContext


def shrink_pad(x: Tensor, pad: int, gen: torch.Generator) -> Tensor:
    """Resize (N, C, H, W) to (H - pad, W - pad) and zero-pad back at a random offset per image."""
    if pad <= 0:
        return x
    n, _, h, w = x.shape
    small = F.interpolate(x, size=(h - pad, w - pad), mode="bilinear", align_corners=False, antialias=True)
    placed = F.pad(small, (0, pad, 0, pad))  # top-left, then shifted by the random offset
    dy = torch.randint(0, pad + 1, (n,), generator=gen, device=x.device)
    dx = torch.randint(0, pad + 1, (n,), generator=gen, device=x.device)
    return shift_images(placed, dy, dx)


@DEFENSES.register("shrinkpad")
class ShrinkPad(Defense):
    """Resize down by `pad` px and zero-pad back at a random offset (intensity: pad)."""

    intensity_param = "pad"

    class Params(PluginParams):
        pad: int = Field(4, ge=0, description="pixels the image shrinks by (per side length) before padding back")

    params: Params
    _gen: torch.Generator | None = None

    def bind(self, model: torch.nn.Module, device: torch.device, seed: int = 0, ctx: DefenseContext | None = None) -> None:
        super().bind(model, device, seed, ctx)
        self._gen = generator(seed, "shrinkpad", device=device)

    def _require_fits(self, height: int, width: int) -> None:
        if self.params.pad >= min(height, width):
            self.fail(f"pad {self.params.pad} must be smaller than the image size {height}x{width}")

    def check(self, meta: DatasetMeta) -> None:
        self._require_fits(meta.height, meta.width)

    def transform(self, x: Tensor) -> Tensor:
        self._require_fits(x.shape[-2], x.shape[-1])
        assert self._gen is not None, "bind() the defense to a model first"
        return shrink_pad(x, self.params.pad, self._gen)
