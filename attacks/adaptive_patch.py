"""Adaptive-Patch (Qi et al., ICLR 2023): weak, diverse patches plus cover samples.

The attack is built to defeat defenses that look for a separate cluster of poisoned samples
in feature space. It uses several patch triggers; each poisoned training sample carries one of
them, blended at a low per-trigger opacity (0.5, 0.5, 0.2, 0.3), and a few more samples
("cover" samples, twice as many) carry the same weak patches but keep their true labels, so
the model must not treat a faint patch alone as the backdoor. The poisoning rate is the
attack's own (0.01; cover 0.02), below the grid's usual 0.1. At test time only the first
``test_patches`` patches (two of the four, as in the paper's code and the REFINE code) are
stamped, at full strength; patch 0 is stamped last, so it lies on top where they overlap.

The patches. The reference code blends four trigger images -- a 5x5 colour square in the
bottom-right corner, four small white marks (a 3x3 "X" of 4 pixels in each image corner), a
colour disc near the top-right corner and an 8x8 colour square near the bottom-right -- covering
25, 16, 140 and 64 pixels of a 32-px image; a patch's mask is where its image is not black.
Nothing is downloaded here: the built-in patches are those four shapes, drawn at the same
places and pixel counts on a 32 x 32 frame (the disc: radius 6.6 about (7.5, 24.5), 140 pixels),
with per-pixel colours drawn from ``pattern_seed`` (the marks stay white), and resized
nearest-neighbour to other image sizes. ``patterns`` loads trigger images from files instead
(e.g. the reference's PNGs), one patch per file, masked where the image is not black.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from attacks.base import Attack, PoisonedSet, PoisonPool
from attacks.patterns import load_image, seeded_uniform
from bench.core.data import ImageSet
from bench.core.device import to_float, to_uint8
from bench.core.params import PluginParams
from bench.core.plugin import DatasetMeta
from bench.core.registry import ATTACKS

FRAME = 32  # the built-in patches are drawn on a 32 x 32 frame, then resized to the images
BUILT_IN = 4


def built_in_masks() -> Tensor:
    """The four built-in patch shapes as 0/1 masks (4, 1, 32, 32): 25, 16, 140 and 64 pixels."""
    masks = torch.zeros(BUILT_IN, 1, FRAME, FRAME)
    masks[0, 0, 27:32, 27:32] = 1  # 5x5 square in the bottom-right corner
    mark = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 0]])  # an "X" of 4 pixels at each corner
    for flip_rows in (False, True):
        for flip_cols in (False, True):
            m = mark.flip(0) if flip_rows else mark
            m = m.flip(1) if flip_cols else m
            rows = slice(FRAME - 3, FRAME) if flip_rows else slice(0, 3)
            cols = slice(FRAME - 3, FRAME) if flip_cols else slice(0, 3)
            masks[1, 0, rows, cols] = m
    ii, jj = torch.meshgrid(torch.arange(FRAME, dtype=torch.float32), torch.arange(FRAME, dtype=torch.float32),
                            indexing="ij")  # fmt: skip
    masks[2, 0] = ((ii - 7.5) ** 2 + (jj - 24.5) ** 2 <= 6.6**2).float()  # disc near the top-right corner
    masks[3, 0, 21:29, 21:29] = 1  # 8x8 square near the bottom-right corner
    return masks


@ATTACKS.register("adaptive_patch")
class AdaptivePatch(Attack):
    """4 patches blended at 0.5/0.5/0.2/0.3 on 1% poisoned + 2% cover samples; the first 2 at full strength at test."""

    version = 2  # reference-shaped patches; only the first two stamped at test time

    class Params(PluginParams):
        alphas: list[Annotated[float, Field(gt=0, le=1)]] = Field(
            [0.5, 0.5, 0.2, 0.3], min_length=1, description="training-time opacity of each patch (one value per patch)")
        poison_rate: float | None = Field(
            0.01, gt=0, lt=1, description="share of the training set poisoned; null: the grid's rate")
        cover_rate: float = Field(0.02, ge=0, lt=1, description="share of the training set stamped but not relabelled")
        test_patches: int = Field(2, ge=1, description="how many patches, the first ones, are stamped at test time "
                                                       "(reference: 2 of 4)")  # fmt: skip
        test_alpha: float = Field(1.0, gt=0, le=1, description="opacity of the test-time patches")
        patterns: list[str] | None = Field(
            None, min_length=1, description="trigger image files, one patch each (masked where not black); "
                                            "null: the 4 built-in patches")  # fmt: skip
        pattern_seed: int = Field(0, description="seed of the built-in patches' colours")

        @field_validator("patterns")
        @classmethod
        def _files_exist(cls, value: list[str] | None) -> list[str] | None:
            for path in value or []:
                if not Path(path).expanduser().is_file():
                    raise ValueError(f"must name existing image files; {path!r} is not one")
            return value

        @model_validator(mode="after")
        def _counts_agree(self) -> AdaptivePatch.Params:
            count = len(self.patterns) if self.patterns else BUILT_IN
            what = f"{count} pattern files" if self.patterns else f"{BUILT_IN} built-in patches"
            if len(self.alphas) != count:
                n = len(self.alphas)
                raise ValueError(f"alphas has {n} value{'s' if n != 1 else ''} but there are {what}: give one per patch")
            if self.test_patches > count:
                raise ValueError(f"test_patches is {self.test_patches} but there are {what}")
            return self

    params: Params

    def __init__(self, params: PluginParams | Mapping[str, Any] | None = None, **raw: Any) -> None:
        super().__init__(params, **raw)
        self._cache: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}

    def check(self, meta: DatasetMeta) -> None:
        """Every patch keeps at least one pixel at the dataset's image size."""
        _, masks = self.patches(meta.channels, meta.height, meta.width)
        empty = [j for j in range(masks.shape[0]) if not bool(masks[j].any())]
        if empty:
            self.fail(f"patch {empty[0]} has no pixel left on {meta.height}x{meta.width} images")

    def patches(self, channels: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """(marks, masks): k images (k, C, H, W) holding one patch each, and their 0/1 masks (k, 1, H, W)."""
        key = (channels, height, width)
        if key not in self._cache:
            if self.params.patterns:
                marks = torch.stack([load_image(path, channels, (height, width)) for path in self.params.patterns])
                masks = (marks > 0).any(1, keepdim=True).float()
            else:
                colours = seeded_uniform((BUILT_IN, channels, FRAME, FRAME), self.params.pattern_seed)
                colours[1] = 1.0  # the corner marks are white
                masks = F.interpolate(built_in_masks(), size=(height, width), mode="nearest")
                marks = F.interpolate(colours, size=(height, width), mode="nearest") * masks
            self._cache[key] = (marks, masks)
        return self._cache[key]

    def blend(self, x: Tensor, which: Tensor, alphas: Tensor) -> Tensor:
        """Blend patch ``which[i]`` over image ``i`` at opacity ``alphas[i]``."""
        marks, masks = self.patches(x.shape[1], x.shape[2], x.shape[3])
        mark = marks.to(x.device, x.dtype)[which]
        alpha = masks.to(x.device, x.dtype)[which] * alphas.to(x.device, x.dtype).view(-1, 1, 1, 1)
        return x + alpha * (mark - x)

    def trigger(self, x: Tensor) -> Tensor:
        """Test time: the first ``test_patches`` patches at ``test_alpha``, patch 0 on top."""
        n = x.shape[0]
        for j in reversed(range(self.params.test_patches)):
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
