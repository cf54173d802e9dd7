"""Adaptive-Patch (Qi et al., ICLR 2023): weak, diverse patches plus cover samples.

The attack is built to defeat defenses that look for a separate cluster of poisoned samples
in feature space. It uses several patch triggers; each poisoned training sample carries one of
them, blended at a low per-trigger opacity (0.5, 0.5, 0.2, 0.3), and a few more samples
("cover" samples, twice as many) carry the same weak patches but keep their true labels, so
the model must not treat a faint patch alone as the backdoor. The poisoning rate is the
attack's own (0.01; cover 0.02), below the grid's usual 0.1. At test time every patch is
stamped at full strength. The patches are random colour squares at random, non-overlapping
positions, both drawn from ``pattern_seed``: nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor

from attacks.base import Attack, PoisonedSet, PoisonPool
from attacks.patterns import seeded_uniform
from bench.core.data import ImageSet
from bench.core.device import to_float, to_uint8
from bench.core.params import PluginParams
from bench.core.plugin import DatasetMeta
from bench.core.registry import ATTACKS


@ATTACKS.register("adaptive_patch")
class AdaptivePatch(Attack):
    """4 seeded patches blended at 0.5/0.5/0.2/0.3 on 1% poisoned + 2% cover samples; full strength at test."""

    class Params(PluginParams):
        alphas: list[Annotated[float, Field(gt=0, le=1)]] = Field(
            [0.5, 0.5, 0.2, 0.3], min_length=1, description="training-time opacity of each patch (one patch per value)")
        poison_rate: float | None = Field(
            0.01, gt=0, lt=1, description="share of the training set poisoned; null: the grid's rate")
        cover_rate: float = Field(0.02, ge=0, lt=1, description="share of the training set stamped but not relabelled")
        test_alpha: float = Field(1.0, gt=0, le=1, description="opacity of every patch at test time")
        size: int | None = Field(None, ge=1, description="patch side in pixels; null: an eighth of the shorter side")
        pattern_seed: int = Field(0, description="seed of the patches' colours and positions")

    params: Params

    def __init__(self, params: PluginParams | Mapping[str, Any] | None = None, **raw: Any) -> None:
        super().__init__(params, **raw)
        self._cache: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}

    def patch_size(self, height: int, width: int) -> int:
        """The configured size, else an eighth of the shorter side (4 px on CIFAR-10)."""
        size = self.params.size
        return size if size is not None else max(2, min(height, width) // 8)

    def patch_grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(patch side, rows, columns) of the grid of cells the patches are placed on."""
        s = self.patch_size(height, width)
        k = len(self.params.alphas)
        if (height // s) * (width // s) < k:
            self.fail(f"{k} patches of {s}x{s} px do not fit a {height}x{width} image")
        return s, height // s, width // s

    def check(self, meta: DatasetMeta) -> None:
        self.patch_grid(meta.height, meta.width)

    def patches(self, channels: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """(marks, masks): k images (k, C, H, W) holding one patch each, and their 0/1 masks (k, 1, H, W)."""
        key = (channels, height, width)
        if key not in self._cache:
            k = len(self.params.alphas)
            s, cells_r, cells_c = self.patch_grid(height, width)
            gen = torch.Generator().manual_seed(self.params.pattern_seed)
            cells = torch.randperm(cells_r * cells_c, generator=gen)[:k].tolist()
            colours = seeded_uniform((k, channels, s, s), self.params.pattern_seed)
            marks = torch.zeros(k, channels, height, width)
            masks = torch.zeros(k, 1, height, width)
            for j, cell in enumerate(cells):
                r, c = (cell // cells_c) * s, (cell % cells_c) * s
                marks[j, :, r : r + s, c : c + s] = colours[j]
                masks[j, :, r : r + s, c : c + s] = 1.0
            self._cache[key] = (marks, masks)
        return self._cache[key]

    def blend(self, x: Tensor, which: Tensor, alphas: Tensor) -> Tensor:
        """Blend patch ``which[i]`` over image ``i`` at opacity ``alphas[i]``."""
        marks, masks = self.patches(x.shape[1], x.shape[2], x.shape[3])
        mark = marks.to(x.device, x.dtype)[which]
        alpha = masks.to(x.device, x.dtype)[which] * alphas.to(x.device, x.dtype).view(-1, 1, 1, 1)
        return x + alpha * (mark - x)

    def trigger(self, x: Tensor) -> Tensor:
        """Test time: every patch at full strength (``test_alpha``)."""
        n = x.shape[0]
        for j in range(len(self.params.alphas)):
            x = self.blend(x, torch.full((n,), j, dtype=torch.int64), torch.full((n,), self.params.test_alpha))
        return x

    def weak_patches(self, x: Tensor) -> Tensor:
        """Training time: sample ``i`` of the batch gets patch ``i mod k`` at that patch's low alpha."""
        alphas = self.params.alphas
        which = torch.arange(x.shape[0]) % len(alphas)
        return to_uint8(self.blend(to_float(x), which, torch.tensor(alphas)[which]).clamp(0, 1))

    def poison_train(
        self, train: ImageSet, rate: float, target: int, gen: torch.Generator, pool: PoisonPool = "non_target"
    ) -> PoisonedSet:
        """Weak patches on the poisoned samples (relabelled) and on the cover samples (labels kept)."""
        index = self.select_poison_index(train, rate, target, gen, pool)
        cover = self.select_cover_index(train, round(self.params.cover_rate * len(train)), index, gen)
        x, y = train.x.clone(), train.y.clone()
        if index.numel():
            x[index] = self.weak_patches(train.x[index])
            y[index] = target
        if cover.numel():
            x[cover] = self.weak_patches(train.x[cover])
        return PoisonedSet(ImageSet(x, y, train.classes), index, cover)
