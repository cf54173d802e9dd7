"""PhysicalBA (Li et al., 2021): BadNets whose training set is seen through physical transformations.

The poisoned samples carry the BadNets patch and the target label as in BadNets, but *every*
training batch (clean and poisoned) is flipped, brightness-jittered and randomly rotated,
shifted and scaled, each image with its own parameters. The backdoor so learned survives the
changes of pose and lighting a physical trigger meets; the test-time trigger is the plain patch.
``p`` < 1 transforms only that share of the training images (the paper transforms all: p = 1),
a knob for short training runs, where always-shrunken training images cost clean accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attacks.badnets import BadNets
from attacks.transforms import random_affine, random_brightness
from bench.core.errors import BenchError
from bench.core.params import require_between
from bench.core.registry import ATTACKS
from bench.nn.augment import random_flip


@ATTACKS.register("physical_ba")
class PhysicalBA(BadNets):
    """BadNets patch + per-sample flip, brightness 0.1, affine (rotate 10 deg, translate 0.1, scale 0.8-0.9) in training."""

    def __init__(
        self,
        flip: bool = True,
        brightness: float = 0.1,
        degrees: float = 10.0,
        translate: float = 0.1,
        scale: tuple[float, float] | list[float] = (0.8, 0.9),
        p: float = 1.0,
        **params: Any,
    ) -> None:
        super().__init__(**params)
        if brightness < 0 or degrees < 0 or not 0 <= translate < 1:
            raise BenchError("physical_ba: brightness and degrees must be >= 0 and translate in [0, 1)")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise BenchError(f"physical_ba: scale must be [low, high] with 0 < low <= high, got {scale}")
        require_between(self.name, "p (share of transformed training images)", p, 0, 1)
        self.flip = flip
        self.brightness = brightness
        self.degrees = degrees
        self.translate = translate
        self.scale = [float(scale[0]), float(scale[1])]
        self.p = p

    def train_augment(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """The physical transformations on every training batch, parameters drawn per image; with
        ``p`` < 1 only that share of the images (drawn per image) is transformed."""
        out = random_flip(x, gen) if self.flip else x
        if self.brightness:
            out = random_brightness(out, gen, self.brightness)
        out = random_affine(out, gen, self.degrees, self.translate, (self.scale[0], self.scale[1]))
        if self.p >= 1:
            return out
        keep = torch.rand(x.shape[0], generator=gen, device=x.device) >= self.p
        return torch.where(keep[:, None, None, None], x, out)
