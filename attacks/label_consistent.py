"""Label-Consistent backdoor (Turner et al., 2019): clean-label poisoning of the target class.

Only target-class training images are poisoned and every label stays correct, so the poisoned
set passes a human label audit. To make the model rely on the trigger, each chosen image is
first made hard to classify: a PGD adversarial perturbation (L-inf, eps 8/255, step 1.5/255,
100 steps) against a clean model trained with the same recipe drives it away from its (true,
target) label; PGD starts from the clean image, as the reference code's ``PGD(...,
random_start=False)`` (``random_start: true`` starts from a random point of the eps-ball). Then
the trigger is stamped with the configured amplitude: by default the paper's 3x3 checkerboard in
each of the four corners (``trigger: corners``, so a horizontal flip keeps it), or a BadNets
patch (``trigger: patch`` with BadNets' ``pattern``/``position``/``size``) -- the REFINE code
stamps its gray 3x3 BadNets square in the bottom-right corner at full opacity.

The poisoning rate is a share of the target class, as the reference code computes it
(REFINE: 25% of CIFAR-10's target class): ``round(rate * n_target)`` images, ``rate`` being the
attack's own ``poison_rate`` or else the grid's.

Not reproduced: the reference code runs PGD on un-normalised images (its ``adv_transform`` is
``ToTensor`` alone) against a clean model trained on normalised ones; here the model normalises
its own input, so PGD attacks the model as it classifies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from attacks.badnets import PatchParams, PatchTrigger
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
    random_start: bool = False,
) -> Tensor:
    """Untargeted L-inf PGD on float images ``x`` (on the model's device): maximise the loss of
    ``y``, from ``x`` itself or, with ``random_start``, from a uniform point of the eps-ball."""
    out = torch.empty_like(x)
    chunks = range(0, x.shape[0], batch_size)
    for start in tqdm(chunks, desc=desc, leave=False, disable=None):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        adv = xb.clone()
        if random_start:
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
class LabelConsistent(PatchTrigger, Attack):
    """Clean-label: PGD (eps 8/255, 100 steps) on a share of the target class, then four corner checkerboards."""

    version = 2  # rate = share of the target class; PGD without random start; patch trigger option

    clean_label = True

    class Params(PatchParams):
        eps: float = Field(8 / 255, ge=0, description="L-inf radius of the PGD perturbation, in [0, 1] pixel units")
        step: float = Field(1.5 / 255, gt=0, description="PGD step size")
        steps: int = Field(100, ge=0, description="PGD steps")
        random_start: bool = Field(False, description="start PGD from a uniform random point of the eps-ball "
                                                      "(reference code: no, from the clean image)")  # fmt: skip
        trigger: Literal["corners", "patch"] = Field(
            "corners", description="'corners': a checkerboard in each corner (paper); 'patch': the BadNets patch "
                                   "(pattern, position, size; REFINE code)")  # fmt: skip
        amplitude: float = Field(1.0, gt=0, le=1, description="opacity of the trigger")
        size: int = Field(3, ge=1, description="side of each corner checkerboard, or of the patch (an explicit "
                                               "pattern: its side)")  # fmt: skip
        poison_rate: float | None = Field(
            None, gt=0, lt=1, description="share of the target class poisoned; null: the grid's rate")

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
        if self.params.trigger == "corners":
            self.corner_masks(meta.height, meta.width)
        else:
            self.check_patch(meta)

    def trigger(self, x: Tensor) -> Tensor:
        amplitude = self.params.amplitude
        if self.params.trigger == "patch":
            stamped = self.stamp_patch(x)
            return stamped if amplitude == 1 else x + amplitude * (stamped - x)
        pattern, mask = self.corner_masks(x.shape[2], x.shape[3])
        pattern = pattern.to(device=x.device, dtype=x.dtype)
        alpha = (amplitude * mask).to(device=x.device, dtype=x.dtype)
        return x + alpha * (pattern - x)

    def poison_train(
        self, train: ImageSet, rate: float, target: int, gen: torch.Generator, pool: PoisonPool = "non_target"
    ) -> PoisonedSet:
        """Adversarially perturb ``round(rate * n_target)`` target-class images, stamp the trigger,
        keep every label (``pool`` does not apply: the poison comes from the target class)."""
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
                                      random_start=p.random_start, desc="label_consistent PGD")  # fmt: skip
            x[index] = self.apply(to_uint8(adv)).cpu()
        return PoisonedSet(ImageSet(x, train.y.clone(), train.classes), index)
