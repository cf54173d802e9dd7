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

from typing import Any

import torch
from torch import Tensor

from attacks.base import Attack, PoisonedSet
from attacks.patterns import seeded_uniform
from bench.core.data import ImageSet
from bench.core.device import to_float, to_uint8
from bench.core.errors import BenchError
from bench.core.params import require_between, require_count
from bench.core.registry import ATTACKS


@ATTACKS.register("adaptive_patch")
class AdaptivePatch(Attack):
    """4 seeded patches blended at 0.5/0.5/0.2/0.3 on 1% poisoned + 2% cover samples; full strength at test."""

    def __init__(
        self,
        alphas: list[float] | tuple[float, ...] = (0.5, 0.5, 0.2, 0.3),
        poison_rate: float | None = 0.01,
        cover_rate: float = 0.02,
        test_alpha: float = 1.0,
        size: int | None = None,
        pattern_seed: int = 0,
        **params: Any,
    ) -> None:
        super().__init__(**params)
        if not alphas or not all(0 < a <= 1 for a in alphas):
            raise BenchError(f"adaptive_patch: alphas must be a non-empty list of values in (0, 1], got {alphas}")
        require_between(self.name, "poison_rate", poison_rate, 0, 1, "()", or_null="the grid's rate")
        require_between(self.name, "cover_rate", cover_rate, 0, 1, "[)")
        require_between(self.name, "test_alpha", test_alpha, 0, 1, "(]")
        if size is not None:
            require_count(self.name, "size", size)
        self.alphas = [float(a) for a in alphas]
        self.poison_rate = poison_rate
        self.cover_rate = cover_rate
        self.test_alpha = test_alpha
        self.size = size
        self.pattern_seed = pattern_seed
        self._cache: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}

    def patch_size(self, height: int, width: int) -> int:
        """The configured size, else an eighth of the shorter side (4 px on CIFAR-10)."""
        return self.size if self.size is not None else max(2, min(height, width) // 8)

    def patches(self, channels: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """(marks, masks): k images (k, C, H, W) holding one patch each, and their 0/1 masks (k, 1, H, W)."""
        key = (channels, height, width)
        if key not in self._cache:
            k, s = len(self.alphas), self.patch_size(height, width)
            cells_r, cells_c = height // s, width // s
            if cells_r * cells_c < k:
                raise BenchError(f"adaptive_patch: {k} patches of {s}x{s} px do not fit a {height}x{width} image")
            gen = torch.Generator().manual_seed(self.pattern_seed)
            cells = torch.randperm(cells_r * cells_c, generator=gen)[:k].tolist()
            colours = seeded_uniform((k, channels, s, s), self.pattern_seed)
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
        for j in range(len(self.alphas)):
            x = self.blend(x, torch.full((n,), j, dtype=torch.int64), torch.full((n,), self.test_alpha))
        return x

    def weak_patches(self, x: Tensor) -> Tensor:
        """Training time: sample ``i`` of the batch gets patch ``i mod k`` at that patch's low alpha."""
        which = torch.arange(x.shape[0]) % len(self.alphas)
        return to_uint8(self.blend(to_float(x), which, torch.tensor(self.alphas)[which]).clamp(0, 1))

    def poison_train(self, train: ImageSet, rate: float, target: int, gen: torch.Generator) -> PoisonedSet:
        """Weak patches on the poisoned samples (relabelled) and on the cover samples (labels kept)."""
        index = self.select_poison_index(train, rate, target, gen)
        cover = self.select_cover_index(train, round(self.cover_rate * len(train)), index, gen)
        x, y = train.x.clone(), train.y.clone()
        if index.numel():
            x[index] = self.weak_patches(train.x[index])
            y[index] = target
        if cover.numel():
            x[cover] = self.weak_patches(train.x[cover])
        return PoisonedSet(ImageSet(x, y, train.classes), index, cover)
