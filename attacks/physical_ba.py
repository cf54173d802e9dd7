"""PhysicalBA (Li et al., 2021): BadNets whose training set is seen through physical transformations.

The poisoned samples carry the BadNets patch and the target label as in BadNets, but *every*
training batch (clean and poisoned) is flipped, brightness-jittered and randomly rotated,
shifted and scaled, each image with its own parameters, after the standard augmentation. The
backdoor so learned survives the changes of pose and lighting a physical trigger meets; the
test-time trigger is the plain patch. The affine transformation is the reference code's
``torchvision`` ``RandomAffine``: nearest-neighbour resampling and whole-pixel shifts.
``p`` < 1 transforms only that share of the training images (the paper transforms all: p = 1),
a knob for short training runs, where always-shrunken training images cost clean accuracy.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import Tensor

from attacks.badnets import BadNets
from attacks.transforms import random_affine, random_brightness
from bench.core.registry import ATTACKS
from bench.nn.augment import random_flip


@ATTACKS.register("physical_ba")
class PhysicalBA(BadNets):
    """BadNets patch + per-sample flip, brightness 0.1, affine (rotate 10 deg, translate 0.1, scale 0.8-0.9) in training."""

    version = 2  # nearest resampling and whole-pixel shifts (was bilinear, continuous)

    class Params(BadNets.Params):
        flip: bool = Field(True, description="random horizontal flip of every training image")
        brightness: float = Field(0.1, ge=0, description="brightness factor drawn from [1 - b, 1 + b]")
        degrees: float = Field(10.0, ge=0, description="random rotation in [-degrees, degrees]")
        translate: float = Field(0.1, ge=0, lt=1, description="random shift, as a share of the image size per axis")
        scale: tuple[float, float] = Field((0.8, 0.9), description="random scaling range [low, high], 0 < low <= high")
        p: float = Field(1.0, ge=0, le=1, description="share of the training images transformed (the paper: all)")

        @field_validator("scale")
        @classmethod
        def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
            if not 0 < value[0] <= value[1]:
                raise ValueError("must be [low, high] with 0 < low <= high")
            return value

    params: Params

    def train_augment(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """The physical transformations on every training batch, parameters drawn per image; with
        ``p`` < 1 only that share of the images (drawn per image) is transformed."""
        p = self.params
        out = random_flip(x, gen) if p.flip else x
        if p.brightness:
            out = random_brightness(out, gen, p.brightness)
        out = random_affine(out, gen, p.degrees, p.translate, p.scale)
        if p.p >= 1:
            return out
        keep = torch.rand(x.shape[0], generator=gen, device=x.device) >= p.p
        return torch.where(keep[:, None, None, None], x, out)
