"""Training a classifier over in-memory uint8 tensors.

The dataset stays a uint8 tensor (on the GPU when there is one); each step indexes a batch,
converts it to float and augments it in a few batched operations. There is no DataLoader and no
per-sample Python. The steps run in the harness's one loop (:func:`bench.nn.loop.fit_loop`):
bf16 autocast and channels_last on CUDA, no host synchronisation inside an epoch, and a loss
that turns non-finite fails the training with one clear line.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, PositiveInt
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from bench.core.device import to_float
from bench.nn import augment
from bench.nn.loop import Batches, LoopOptions, fit_loop, make_optimizer

BatchTransform = Callable[[Tensor, torch.Generator], Tensor]
# A batch transformation that also gets the batch's indices into the training set.
IndexedTransform = Callable[[Tensor, Tensor, torch.Generator], Tensor]


@dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False))
class TrainRecipe:
    """Optimiser, schedule and augmentation of a training run.

    The defaults are the REFINE paper's recipe for backdoored models (SGD lr 0.1, momentum 0.9,
    weight decay 5e-4, batch 128, 150 epochs, lr x0.1 at epochs 100 and 130). CPU-sized configs
    override ``epochs`` and ``milestones``; ``schedule: onecycle`` with ``label_smoothing`` is the
    faster alternative recipe. ``amp``, ``cpu_bf16``, ``channels_last`` and ``compile`` are the
    loop's :class:`bench.nn.loop.LoopOptions`.
    """

    epochs: int = Field(150, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["multistep", "onecycle", "constant"] = "multistep"
    milestones: list[PositiveInt] = Field(default_factory=lambda: [100, 130])
    gamma: float = Field(0.1, gt=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    crop_padding: int = Field(4, ge=0)
    flip: bool = True
    amp: bool = True  # bf16 autocast on CUDA
    cpu_bf16: bool = False  # bf16 autocast on the CPU too (off: fp32)
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile the step's forward and loss (not measured faster: off)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: TrainRecipe, steps_per_epoch: int):
    """A per-step learning-rate schedule, so that one-cycle and step decay share the loop."""
    if recipe.schedule == "onecycle":
        total = recipe.epochs * steps_per_epoch
        # OneCycleLR divides by (pct_start * total - 1): a one-step warm-up (total 4) would be 1/0.
        pct_start = 0.25 if total != 4 else 0.5
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=total, pct_start=pct_start)
    if recipe.schedule == "multistep":
        milestones = [m * steps_per_epoch for m in recipe.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=recipe.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def standard_augment(recipe: TrainRecipe) -> BatchTransform:
    """Random crop with zero padding + horizontal flip, per image."""

    def apply(x: Tensor, gen: torch.Generator) -> Tensor:
        return augment.crop_and_flip(x, gen, recipe.crop_padding, recipe.flip)

    return apply


def train_classifier(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    recipe: TrainRecipe,
    device: torch.device,
    seed: int,
    batch_augment: IndexedTransform | None = None,
    desc: str = "train",
    hint: str = "lower train.lr",
) -> nn.Module:
    """Train ``model`` on uint8 ``images`` and int64 ``labels``; return it in eval mode.

    ``batch_augment(x, index, gen)``, when given, replaces the standard augmentation of every
    float batch ``x`` whose rows are ``images[index]``: an attack's per-batch transformation,
    which may depend on which samples are poisoned (:meth:`attacks.base.Attack.batch_augment`).
    ``desc`` names the run in the progress bar and in the error raised when the loss becomes
    non-finite, which ends with ``hint``.
    """
    model.to(device)
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    base_augment = standard_augment(recipe)
    augment = batch_augment or (lambda x, _index, g: base_augment(x, g))

    def prepare(idx: Tensor) -> tuple[Tensor, Tensor]:
        return augment(to_float(images[idx]), idx, gen), labels[idx]

    def loss(batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, label_smoothing=recipe.label_smoothing)

    batches = Batches(images.shape[0], recipe.batch_size, gen, prepare)  # drops the ragged last batch: stable BN
    optimizer = make_optimizer("sgd", model.parameters(), device, lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay, nesterov=False)  # fmt: skip
    fit_loop(optimizer, batches, loss, recipe.epochs, device=device, job=desc, hint=hint, train=[model],
             scheduler=make_scheduler(optimizer, recipe, len(batches)), options=LoopOptions.of(recipe))  # fmt: skip
    return model
