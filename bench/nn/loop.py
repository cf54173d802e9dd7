"""The one training loop: every fit in the harness (models, REFINE, the MAE, BTI-DBF's phases).

A caller supplies only what differs between fits: its optimizer (and learning-rate schedule),
its batches (:class:`Batches`: a shuffled permutation per epoch, each slice of indices prepared
-- indexed, converted, augmented on the device -- by the caller), and its loss function on one
prepared batch. :func:`fit_loop` owns everything else, so a speed-up made here lands in every fit:

- **device work, no host synchronisation inside an epoch.** The loss is summed on the device;
  the sum is read once per epoch, for the progress bar and for the non-finite check below;
- **non-finite losses fail the job.** A NaN or infinite loss makes the epoch's sum non-finite
  (NaN and inf propagate through a sum), so the once-per-epoch read doubles as the check: the
  fit raises one clear :class:`BenchError` naming the job, the epoch and what to change, and the
  caller caches nothing;
- **precision and layout on CUDA**: bf16 autocast around the loss function (losses that need
  fp32 turn it off locally: :func:`bench.core.device.full_precision`), channels_last modules and
  image batches, and cuDNN's autotuner unless the grid asked for deterministic kernels. On the
  CPU all of these are off by default, so CPU numbers are those of a plain fp32 loop; CPU bf16
  autocast is an option (:attr:`LoopOptions.cpu_bf16`);
- **optimizers**: :func:`make_optimizer` builds SGD, Adam or AdamW with the fused (single-kernel)
  update on CUDA and torch's default implementation elsewhere;
- **optional torch.compile** of the loss function (the forward passes and the loss; backward is
  compiled with it by AOTAutograd). The optimizer update stays outside: on CUDA the fused
  update is already one kernel. Off by default everywhere: compiling costs tens of seconds per
  fit and whether it pays has not been measured on a GPU.

Why not CUDA graphs: every step draws its augmentation from a ``torch.Generator`` and indexes
the data with a fresh permutation, the learning rate changes as a Python float every step
(captured graphs would need it as a device tensor, and capturable optimizers), BTI-DBF's
epochs end with a smaller batch, and BTI-DBF's (P) mix draws which images to replace; capturing
all that is possible but not simple. ``torch.compile(mode="reduce-overhead")`` would graph the
compiled region only; with the fused optimizer the per-step launch overhead left is small
against the convolutions of these models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Generic, Literal, TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.core.device import autocast
from bench.core.errors import BenchError

B = TypeVar("B")
LossFn = Callable[[Any], "Tensor | tuple[Tensor, Tensor]"]


@dataclass(frozen=True)
class LoopOptions:
    """How a fit computes; none of it changes an fp32 CPU fit's numbers unless asked to.

    Recipes and plugin parameters carry the same-named fields: :meth:`of` reads them.
    """

    amp: bool = True  # bf16 autocast on CUDA
    cpu_bf16: bool = False  # bf16 autocast on the CPU as well
    channels_last: bool = True  # channels_last modules and image batches on CUDA
    compile: bool = False  # torch.compile the loss function

    @classmethod
    def of(cls, settings: Any) -> LoopOptions:
        """The options ``settings`` (a recipe, a plugin's ``Params``) names; the others keep their defaults."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)})


class Batches(Generic[B]):
    """One data path for every fit: ``n`` samples in shuffled mini-batches of ``batch_size``.

    Each pass (epoch) draws one permutation from ``gen`` on its device and hands each slice of
    indices to ``prepare`` (index the data, convert, augment), so the random draws come in the
    same order in every fit: the permutation, then each batch's augmentation. ``drop_last``
    drops the ragged last batch (steady batch statistics, one shape for the autotuner) but always
    keeps at least one batch, of all ``n`` samples when ``n < batch_size``.
    """

    def __init__(self, n: int, batch_size: int, gen: torch.Generator, prepare: Callable[[Tensor], B],
                 drop_last: bool = True) -> None:  # fmt: skip
        if n < 1 or batch_size < 1:
            raise ValueError(f"need at least one sample and a positive batch size, got {n} and {batch_size}")
        self.n, self.batch_size, self.gen, self.prepare, self.drop_last = n, batch_size, gen, prepare, drop_last

    def __len__(self) -> int:
        return max(1, self.n // self.batch_size) if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[B]:
        order = torch.randperm(self.n, generator=self.gen, device=self.gen.device)
        for step in range(len(self)):
            yield self.prepare(order[step * self.batch_size : (step + 1) * self.batch_size])


def make_optimizer(kind: Literal["sgd", "adam", "adamw"], params: Any, device: torch.device,
                   **settings: Any) -> torch.optim.Optimizer:  # fmt: skip
    """``torch.optim.SGD``/``Adam``/``AdamW`` over ``params`` (tensors or parameter groups), with
    the fused update (one kernel for all parameters) on CUDA; on the CPU torch's default
    implementation, whose numbers every CPU fit has always had."""
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return cls(params, **settings, fused=True if device.type == "cuda" else None)


def _channels_last(batch: Any) -> Any:
    """``batch`` with its 4-D floating tensors in channels_last layout (tuples and lists walked)."""
    if isinstance(batch, Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 and batch.is_floating_point() else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_channels_last(item) for item in batch)
    return batch


@contextmanager
def _autotuning(device: torch.device) -> Iterator[None]:
    """cuDNN's kernel search on CUDA, unless deterministic algorithms are on (the search may pick
    another kernel, with other rounding, in the next process); the previous setting comes back."""
    before = torch.backends.cudnn.benchmark
    if device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        # Every step of a fit has the same shapes, so the one-off search pays within an epoch.
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def fit_loop(
    optimizer: torch.optim.Optimizer,
    batches: Batches[Any],
    loss_fn: LossFn,
    epochs: int,
    *,
    device: torch.device,
    job: str,
    hint: str,
    train: Sequence[nn.Module] = (),
    frozen: Sequence[nn.Module] = (),
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    options: LoopOptions = LoopOptions(),
    show: str = "loss",
    postfix: Callable[[], dict[str, str]] | None = None,
) -> float:
    """Run ``epochs`` passes over ``batches``: per batch ``loss_fn(batch)`` under autocast, then
    ``zero_grad``, ``backward``, ``optimizer.step()`` and ``scheduler.step()``; return the last
    epoch's mean loss (NaN after zero epochs).

    ``loss_fn`` returns the loss, or ``(loss, shown)`` when the progress bar should show the mean
    of another figure (as ``show``). ``train`` modules are in training mode during the loop and in
    eval mode after it; they and the ``frozen`` ones (evaluated, never updated) are channels_last
    on CUDA when ``options.channels_last``. ``postfix`` adds figures to the bar once per epoch.
    A non-finite loss raises ``BenchError("<job>: the loss became nan at epoch E; <hint>")``.
    """
    cuda = device.type == "cuda"
    channels_last = cuda and options.channels_last
    for module in (*train, *frozen):
        if channels_last:
            module.to(device, memory_format=torch.channels_last)
        else:
            module.to(device)
    step_loss = torch.compile(loss_fn) if options.compile else loss_fn
    precision = autocast(device, cuda_bf16=options.amp, cpu_bf16=options.cpu_bf16)
    steps = len(batches)
    mean = float("nan")
    for module in train:
        module.train()
    with _autotuning(device), tqdm(total=epochs * steps, desc=job, leave=False, disable=None) as bar:
        for epoch in range(1, epochs + 1):
            total = torch.zeros((), device=device)
            shown = None
            for batch in batches:
                if channels_last:
                    batch = _channels_last(batch)
                with precision:
                    out = step_loss(batch)
                loss, figure = out if isinstance(out, tuple) else (out, None)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                total += loss.detach()
                if figure is not None:
                    shown = figure.detach().float() if shown is None else shown + figure.detach()
                bar.update(1)
            mean = float(total / steps)  # the epoch's one host synchronisation
            if not math.isfinite(mean):
                kind = "nan" if math.isnan(mean) else "inf" if mean > 0 else "-inf"
                raise BenchError(f"{job}: the loss became {kind} at epoch {epoch}; {hint}")
            figures = {show: f"{mean if shown is None else float(shown / steps):.4f}"}
            bar.set_postfix(**figures, **(postfix() if postfix is not None else {}))
    for module in train:
        module.eval()
    return mean
