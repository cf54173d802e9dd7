"""Training over in-memory uint8 tensors.

The dataset stays a uint8 tensor (on the GPU when there is one); each step indexes a batch,
converts it to float and augments it in a few batched operations. There is no DataLoader and no
per-sample Python. On CUDA the step runs under bf16 autocast with channels_last tensors, and the
loop never synchronises with the host inside an epoch: the running loss is accumulated on the
device and read once per epoch for the progress bar.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, PositiveInt
from pydantic.dataclasses import dataclass
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.core.device import to_float
from bench.nn import augment

BatchTransform = Callable[[Tensor, torch.Generator], Tensor]
# A batch transformation that also gets the batch's indices into the training set.
IndexedTransform = Callable[[Tensor, Tensor, torch.Generator], Tensor]


@dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False))
class TrainRecipe:
    """Optimiser, schedule and augmentation of a training run.

    The defaults are the REFINE paper's recipe for backdoored models (SGD lr 0.1, momentum 0.9,
    weight decay 5e-4, batch 128, 150 epochs, lr x0.1 at epochs 100 and 130). CPU-sized configs
    override ``epochs`` and ``milestones``; ``schedule: onecycle`` with ``label_smoothing`` is the
    faster alternative recipe.
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
    amp: bool = True
    channels_last: bool = True
    compile: bool = False


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
        x = augment.random_crop(x, recipe.crop_padding, gen)
        return augment.random_flip(x, gen) if recipe.flip else x

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
) -> nn.Module:
    """Train ``model`` on uint8 ``images`` and int64 ``labels``; return it in eval mode.

    ``batch_augment(x, index, gen)``, when given, replaces the standard augmentation of every
    float batch ``x`` whose rows are ``images[index]``: an attack's per-batch transformation,
    which may depend on which samples are poisoned (:meth:`attacks.base.Attack.batch_augment`).
    """
    model.to(device)
    use_cuda = device.type == "cuda"
    if use_cuda and not torch.are_deterministic_algorithms_enabled():
        # Every step has the same shapes (the ragged last batch is dropped), so cuDNN's one-off
        # kernel search pays for itself within the first epoch. Not in deterministic mode: the
        # search may pick another kernel, with other rounding, in the next process.
        torch.backends.cudnn.benchmark = True
    if use_cuda and recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if recipe.compile else model
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    n = images.shape[0]
    steps_per_epoch = max(1, n // recipe.batch_size)  # drop the ragged last batch: stable BN
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, nesterov=False,
        fused=True if use_cuda else None,  # one kernel for the whole update on the GPU
    )
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch)
    base_augment = standard_augment(recipe)
    augment = batch_augment or (lambda x, _index, g: base_augment(x, g))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda and recipe.amp)
    model.train()
    bar = tqdm(range(recipe.epochs), desc=desc, leave=False, disable=None)
    for _ in bar:
        order = torch.randperm(n, generator=gen, device=device)
        running = torch.zeros((), device=device)
        for step in range(steps_per_epoch):
            idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            x = augment(to_float(images[idx]), idx, gen)
            if use_cuda and recipe.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = F.cross_entropy(step_model(x), labels[idx], label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.detach()
        bar.set_postfix(loss=f"{(running / steps_per_epoch).item():.3f}")
    model.eval()
    return model
