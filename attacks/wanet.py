"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible, smooth warping of the whole image.

The warping field is drawn once per cell: a k x k control grid of uniform noise in [-1, 1],
normalised to mean absolute value 1, upsampled bicubically to the image size. The trigger moves
every pixel by ``s * field / size`` in ``grid_sample``'s [-1, 1] coordinates (clamped to the
image), so the test-time trigger is exactly the training-time one. ``k`` is 4 in the WaNet
paper (a smooth field, the default); the REFINE code draws the grid at the image size (k = 32
on CIFAR-10), a per-pixel jitter.

In noise ("cross") mode, ``cross_ratio`` times as many extra samples are warped by the field
plus per-pixel random noise and keep their true labels, which forces the model to learn the
exact field rather than "any warp" (the WaNet paper uses cross_ratio 2; 0 switches the mode
off). As in the WaNet paper and BackdoorBox, the noise is drawn afresh each time a sample is
seen -- every epoch -- from its clean original, before the standard augmentation (the
reference warps the stored image before its flip); ``poison_train`` returns one such draw.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from attacks.base import Attack, FitContext, PoisonedSet, PoisonPool, SampleSource
from bench.core.data import ImageSet
from bench.core.device import to_float, to_uint8
from bench.core.errors import BenchError
from bench.core.params import PluginParams
from bench.core.registry import ATTACKS
from bench.nn.train import BatchTransform, IndexedTransform


@ATTACKS.register("wanet")
class WaNet(Attack):
    """Smooth warping trigger: k x k noise grid (k=4), bicubic upsampling, strength s=0.5; optional noise mode."""

    version = 2  # noise mode: fresh noise every epoch (was drawn once when poisoning)

    class Params(PluginParams):
        k: int = Field(4, ge=2, description="side of the control grid of random offsets (WaNet paper: 4; REFINE "
                                            "code: the image size)")  # fmt: skip
        s: float = Field(0.5, ge=0, description="warping strength")
        cross_ratio: float = Field(0.0, ge=0, description="noise-mode samples per poisoned sample (paper: 2; 0: off)")
        grid_rescale: float = Field(1.0, gt=0, le=1, description="scale of the warped grid, keeping it inside the image")

    params: Params

    def __init__(self, params: PluginParams | Mapping[str, Any] | None = None, **raw: Any) -> None:
        super().__init__(params, **raw)
        self._control: Tensor | None = None  # (1, 2, k, k), drawn in fit()
        self._grids: dict[tuple[int, int, torch.device], Tensor] = {}

    def fit(self, train: ImageSet, gen: torch.Generator, ctx: FitContext | None = None) -> None:
        """Draw the control grid from the cell's generator (cheap: k x k numbers)."""
        k = self.params.k
        control = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
        self._control = control / control.abs().mean()
        self._grids.clear()

    def warp_grid(self, height: int, width: int, device: torch.device) -> Tensor:
        """The sampling grid (1, H, W, 2) of the trigger: identity + s * upsampled field / size
        (computed once per size and device)."""
        if self._control is None:
            raise BenchError("wanet: the warping field is drawn in fit(); call fit() before applying the trigger")
        key = (height, width, device)
        if key not in self._grids:
            self._grids[key] = self._grid(height, width).to(device)
        return self._grids[key]

    def _grid(self, height: int, width: int) -> Tensor:
        assert self._control is not None
        field = F.interpolate(self._control, size=(height, width), mode="bicubic", align_corners=True)
        field = field.permute(0, 2, 3, 1)  # (1, H, W, 2): x (column) and y (row) offsets
        rows = torch.linspace(-1, 1, height)
        cols = torch.linspace(-1, 1, width)
        identity = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1)[None]
        offset = self.params.s * field / torch.tensor([width, height], dtype=field.dtype)
        return ((identity + offset) * self.params.grid_rescale).clamp(-1, 1)

    @staticmethod
    def warp(x: Tensor, grid: Tensor) -> Tensor:
        return F.grid_sample(x, grid.to(x.dtype).expand(x.shape[0], -1, -1, -1), mode="bilinear",
                             padding_mode="zeros", align_corners=True)  # fmt: skip

    def trigger(self, x: Tensor) -> Tensor:
        return self.warp(x, self.warp_grid(x.shape[2], x.shape[3], x.device))

    def noise_warp(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Noise mode: the trigger's grid plus independent per-pixel noise of up to half a pixel (drawn
        on ``gen``'s device), rounded to uint8 levels as the stored poisoned images are."""
        n, _, h, w = x.shape
        grid = self.warp_grid(h, w, x.device).to(x.dtype)
        noise = torch.rand(n, h, w, 2, generator=gen, device=gen.device).to(device=x.device, dtype=x.dtype) * 2 - 1
        noise[..., 0] /= w  # x offsets in units of the width, y offsets of the height
        noise[..., 1] /= h
        grid = (grid + noise).clamp(-1, 1)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return to_float(to_uint8(out.clamp(0, 1))).to(x.dtype)

    def poison_train(
        self, train: ImageSet, rate: float, target: int, gen: torch.Generator, pool: PoisonPool = "non_target"
    ) -> PoisonedSet:
        """All-to-one poisoning, plus ``cross_ratio`` x as many noise-warped samples with true labels."""
        poisoned = super().poison_train(train, rate, target, gen, pool)
        count = round(self.params.cross_ratio * poisoned.poisoned_index.numel())
        if count == 0:
            return poisoned
        cover = self.select_cover_index(train, count, poisoned.poisoned_index, gen)
        x = poisoned.train.x
        x[cover] = to_uint8(self.noise_warp(to_float(train.x[cover]), gen))
        return PoisonedSet(ImageSet(x, poisoned.train.y, train.classes), poisoned.poisoned_index, cover)

    def batch_augment(self, clean: ImageSet, poisoned: PoisonedSet, standard: BatchTransform) -> IndexedTransform:
        """Noise mode: every batch re-warps its noise-mode samples from their clean originals
        with fresh noise, then the standard augmentation runs (and :meth:`train_augment`)."""
        if not poisoned.cover_index.numel():
            return super().batch_augment(clean, poisoned, standard)
        source = SampleSource(clean, poisoned.cover_index)

        def apply(x: Tensor, index: Tensor, gen: torch.Generator) -> Tensor:
            originals, hit = source.swap_in(x, index)
            x = torch.where(hit[:, None, None, None], self.noise_warp(originals, gen), x)
            return self.train_augment(standard(x, gen), gen)

        return apply
