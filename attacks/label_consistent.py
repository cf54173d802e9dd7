"""Label-Consistent backdoor (Turner et al., 2019): clean-label poisoning of the target class.

Only target-class training images are poisoned and every label stays correct, so the poisoned
set passes a human label audit. To make the model rely on the trigger, each chosen image is
first made hard to classify: a PGD adversarial perturbation (L-inf, eps 8/255, step 1.5/255,
100 steps, random start) against a clean model trained with the same recipe drives it away
from its (true, target) label; then the trigger -- a 3x3 checkerboard in each of the four
corners, so a horizontal flip keeps it -- is stamped with the configured amplitude.

The number of poisoned images is ``round(rate * N)`` of the whole training set, taken from the
target class; ``poison_rate`` sets the rate for this attack alone. At the usual grid rate of 10%
on a class-balanced 10-class set that is the entire target class, and the trigger then marks
every target-class training image -- a much easier backdoor than the paper's partial poisoning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from attacks.base import Attack, FitContext, PoisonedSet, PoisonPool
from bench.core.data import ImageSet
from bench.core.device import to_float, to_uint8
from bench.core.errors import BenchError
from bench.core.params import PluginParams
from bench.core.plugin import DatasetMeta
from bench.core.registry import ATTACKS


def pgd_away_from_label(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step: float,
    steps: int,
    gen: torch.Generator,
    batch_size: int = 256,
    desc: str = "PGD",
) -> Tensor:
    """Untargeted L-inf PGD on float images ``x`` (on the model's device): maximise the loss of ``y``."""
    out = torch.empty_like(x)
    chunks = range(0, x.shape[0], batch_size)
    for start in tqdm(chunks, desc=desc, leave=False, disable=None):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        noise = torch.rand(xb.shape, generator=gen).to(xb.device) * 2 - 1
        adv = (xb + eps * noise).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(adv), yb)
                (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + step * grad.sign()
            adv = torch.min(torch.max(adv, xb - eps), xb + eps).clamp(0, 1)
        out[start : start + batch_size] = adv.detach()
    return out


@ATTACKS.register("label_consistent")
class LabelConsistent(Attack):
    """Clean-label: PGD (eps 8/255, 100 steps) on target-class images, then a four-corner 3x3 checkerboard."""

    clean_label = True

    class Params(PluginParams):
        eps: float = Field(8 / 255, ge=0, description="L-inf radius of the PGD perturbation, in [0, 1] pixel units")
        step: float = Field(1.5 / 255, gt=0, description="PGD step size")
        steps: int = Field(100, ge=0, description="PGD steps")
        amplitude: float = Field(1.0, gt=0, le=1, description="opacity of the corner checkerboards")
        size: int = Field(3, ge=1, description="side of each corner checkerboard in pixels")
        poison_rate: float | None = Field(
            None, gt=0, lt=1, description="share of the training set poisoned (from the target class); null: the grid's rate")

    params: Params

    def __init__(self, params: PluginParams | Mapping[str, Any] | None = None, **raw: Any) -> None:
        super().__init__(params, **raw)
        self._ctx: FitContext | None = None

    def fit(self, train: ImageSet, gen: torch.Generator, ctx: FitContext | None = None) -> None:
        """Remember how to get the clean model; it is trained only if poisoning actually happens."""
        self._ctx = ctx

    def corner_masks(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """(pattern, mask), each (H, W): a checkerboard mirrored into the four corners."""
        s = self.params.size
        if 2 * s > min(height, width):
            self.fail(f"{s}x{s} corner patterns do not fit a {height}x{width} image")
        ii, jj = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        board = ((ii + jj) % 2 == 0).float()  # white at the outer corner pixel
        pattern = torch.zeros(height, width)
        mask = torch.zeros(height, width)
        for flip_rows in (False, True):
            for flip_cols in (False, True):
                patch = board.flip(0) if flip_rows else board
                patch = patch.flip(1) if flip_cols else patch
                rows = slice(height - s, height) if flip_rows else slice(0, s)
                cols = slice(width - s, width) if flip_cols else slice(0, s)
                pattern[rows, cols] = patch
                mask[rows, cols] = 1.0
        return pattern, mask

    def check(self, meta: DatasetMeta) -> None:
        self.corner_masks(meta.height, meta.width)

    def trigger(self, x: Tensor) -> Tensor:
        pattern, mask = self.corner_masks(x.shape[2], x.shape[3])
        pattern = pattern.to(device=x.device, dtype=x.dtype)
        alpha = (self.params.amplitude * mask).to(device=x.device, dtype=x.dtype)
        return x + alpha * (pattern - x)

    def poison_train(
        self, train: ImageSet, rate: float, target: int, gen: torch.Generator, pool: PoisonPool = "non_target"
    ) -> PoisonedSet:
        """Adversarially perturb ``round(rate * N)`` target-class images, stamp the trigger, keep labels
        (``pool`` does not apply: the poison comes from the target class)."""
        index = self.select_poison_index(train, rate, target, gen)
        x = train.x.clone()
        if index.numel():
            if self._ctx is None or self._ctx.train_clean_model is None:
                raise BenchError("label_consistent needs a clean model: call fit() with a FitContext that can train one")
            model = self._ctx.train_clean_model()
            device = self._ctx.device
            clean = to_float(train.x[index].to(device))
            p = self.params
            adv = pgd_away_from_label(model, clean, train.y[index].to(device), p.eps, p.step, p.steps, gen,
                                      desc="label_consistent PGD")  # fmt: skip
            x[index] = self.apply(to_uint8(adv)).cpu()
        return PoisonedSet(ImageSet(x, train.y.clone(), train.classes), index)
