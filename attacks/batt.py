"""BATT (Xu et al., ICASSP 2023): a spatial transformation as the trigger.

The poisoned images are the clean images rotated by a fixed angle (the BATT-R variant, 16
degrees counter-clockwise by default); no pattern is added. Rotation leaves black corners and
tilts the content, which the model learns to associate with the target label, while the same
rotation at test time activates the backdoor. Resampling is nearest-neighbour, as PIL's
``Image.rotate`` in the reference code (bit-identical to it on CIFAR-10 images).

Training follows the reference code (BackdoorBox's BATT, used by the REFINE code): the rotation
is applied *after* the standard augmentation, so every poisoned image the model sees is the +16
degree rotation of its (possibly flipped) original -- rotating first and flipping after would
show half of them at -16 degrees -- and every clean training image gets a random rotation in
[-``clean_degrees``, ``clean_degrees``] (the reference's ``RandomAffine(degrees=10)``, also
nearest, after the flip), so that "rotated" alone does not mean "target". ``poison_train``
returns the poisoned images rotated (what one epoch without augmentation would show).

Not reproduced: the reference applies the fixed rotation to a normalised tensor converted back
to a PIL image (``ToPILImage`` of values outside [0, 1] wraps around uint8) and does not
normalise again, and fills the clean images' corners with 0 of the normalised tensor (the mean
colour); here both rotations act on pixels in [0, 1] with black fill, as the model normalises
its own input.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import Tensor

from attacks.base import Attack, PoisonedSet, SampleSource
from attacks.transforms import rotate
from bench.core.data import ImageSet
from bench.core.params import PluginParams
from bench.core.registry import ATTACKS
from bench.nn.train import BatchTransform, IndexedTransform


@ATTACKS.register("batt")
class BATT(Attack):
    """Rotation trigger: poisoned images rotated by 16 degrees (nearest) after augmentation; clean ones by +-10."""

    version = 2  # nearest resampling; rotation after the augmentation; random rotation of clean images

    class Params(PluginParams):
        angle: float = Field(16.0, gt=-180, le=180, description="rotation in degrees, counter-clockwise; not 0")
        clean_degrees: float = Field(
            10.0, ge=0, le=180, description="random rotation in [-d, d] of every clean training image (reference: 10; "
                                            "0: none)")  # fmt: skip

        @field_validator("angle")
        @classmethod
        def _not_zero(cls, value: float) -> float:
            if value == 0:
                raise ValueError("must be a non-zero number of degrees in (-180, 180]")
            return value

    params: Params

    def trigger(self, x: Tensor) -> Tensor:
        return rotate(x, self.params.angle)

    def batch_augment(self, clean: ImageSet, poisoned: PoisonedSet, standard: BatchTransform) -> IndexedTransform:
        """Poisoned rows restart from their clean originals; the whole batch is augmented, then
        the poisoned rows are rotated by ``angle`` and the others by a random angle."""
        source = SampleSource(clean, poisoned.poisoned_index)
        p = self.params

        def apply(x: Tensor, index: Tensor, gen: torch.Generator) -> Tensor:
            x, hit = source.swap_in(x, index)
            x = standard(x, gen)
            spread = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=x.dtype) * 2 - 1
            angles = torch.where(hit, torch.full_like(spread, p.angle), spread * p.clean_degrees)
            return rotate(x, angles)

        return apply
