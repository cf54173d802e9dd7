"""Poisoning throughput over one training epoch: the harness's batched path against the
per-sample ``__getitem__`` path that the public toolkits run in every epoch.

Both paths deliver the same thing: one epoch of the 50,000 CIFAR-10 training images in batches
of 128, the attack's share of them (10% by default; Adaptive-Patch's own 1% + 2% cover) carrying
the trigger and the attacker's label, as float tensors in [0, 1] on the device, in index order.

Batched path (what the harness does for a cell): ``attack.poison_train`` over the uint8 training
set (the trigger runs on all poisoned images at once, in a few tensor operations), the poisoned
uint8 set moves to the device, and each batch becomes float with ``to_float``, as
``train_classifier`` does before augmenting. The trigger pass is in the timed epoch although
the harness pays it once per cell: later epochs are cheaper still.

Per-sample path (what BackdoorBox and the REFINE code run): a ``torch.utils.data.Dataset`` whose
images are stored as H x W x C uint8 numpy arrays; ``__getitem__`` triggers the index if it is
in the poisoned set and converts with ``torchvision.transforms.ToTensor``; a ``DataLoader``
(``--loader-workers``, default 0: in this process, on one thread like a worker) collates the
batches, which move to the device. The trigger per image, as the toolkits write it:

- badnets, physical_ba: numpy slice assignment of the uint8 patch into a copy of the image
  (BackdoorBox blends ``(1 - w) * img + w * pattern`` with a 0/1 weight: the same pixels).
- blended: ``(1 - a) * img + a * pattern`` in float32, back to uint8 by rounding. BackdoorBox
  truncates (``.type(torch.uint8)``) and the REFINE code keeps the float; rounding is the
  harness's convention and costs the same.
- adaptive_patch: each sample's patch blended in float32 over its bounding box, weighted by the
  patch's mask (``img + a * mask * (patch - img)``), rounded to uint8; poisoned and cover samples
  get patches in the order ``poison_train`` gives.
- wanet: ``ToTensor``, then ``F.grid_sample`` on the single image with the attack's fixed
  sampling grid, float out (BackdoorBox's WaNet inserted after ``ToTensor``, as the REFINE code
  inserts it).
- batt: ``ToTensor``, then ``F.grid_sample`` (nearest) on the single image with the fixed
  16-degree rotation grid, drawn once. The REFINE code rotates a PIL image (``img.rotate(16)``,
  nearest): the same pixels, and no cheaper per image (PIL round trip about 100 us against 60 us
  for this, one core here). The harness applies BATT's training-time rotation per batch after
  the flip (see ``attacks/batt.py``); this epoch streams the stored poisoned images.

Label-Consistent has no per-sample path here: its poisons are PGD images computed once (the
toolkits store them too) and then stamped like BadNets. Train-time augmentation (crop and flip,
Physical-BA's physical transformations) is not poisoning; neither path includes it.

Every run checks, batch by batch, that both paths deliver the same batches (and labels) and
stops with an error if not: uint8-identical for the uint8 triggers (BATT's nearest rotation
included); for WaNet within half a uint8 step (0.5/255, plus 1e-5 of float slack), because the
harness stores its poisoned images as uint8 while the per-sample path keeps the warped float.
The table shows the largest difference in uint8 steps and how many values would round to a
different uint8.

    python benchmarks/poisoning.py [--attacks badnets wanet] [--images N] [--csv FILE]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import ToTensor

from attacks.base import Attack, FitContext, PoisonedSet
from attacks.transforms import affine_theta
from bench.core.data import ImageSet
from bench.core.device import to_float, to_uint8
from bench.core.errors import BenchError
from bench.core.models import build_model
from bench.core.registry import ATTACKS
from bench.core.seeding import generator
from benchmarks.common import (
    add_common_args,
    best_seconds,
    describe_device,
    device_from_args,
    load_cifar10,
    random_subset,
    report,
    script_main,
    significant,
)

CSV_COLUMNS = ["attack", "triggered", "batched_img_per_s", "per_sample_img_per_s", "ratio", "batched_s",
               "per_sample_s", "max_diff_uint8", "uint8_mismatches", "device"]  # fmt: skip
TO_TENSOR = ToTensor()
HALF_STEP = 0.5 / 255
FLOAT_SLACK = 1e-5  # a kernel may order a sum differently for one image than for a batch

# (index, stored H x W x C uint8 image) -> float C x H x W tensor in [0, 1]
PerSample = Callable[[int, np.ndarray], Tensor]


# --------------------------------------------------------------------------- per-sample triggers


def as_float(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1], the same arithmetic as ``to_float``."""
    return image.astype(np.float32) / np.float32(255)


def as_uint8(image: np.ndarray) -> np.ndarray:
    """float32 in [0, 1] -> uint8 by rounding (half to even, as ``torch.round``), like ``to_uint8``."""
    return np.rint(np.clip(image, 0, 1) * np.float32(255)).astype(np.uint8)


def patch_trigger(attack: Attack, poisoned: PoisonedSet, shape: tuple[int, int, int]) -> PerSample:
    h, w, c = shape
    row, col, s = attack.patch_box(h, w)
    patch = to_uint8(attack.patch(c, s, torch.device("cpu"))).permute(1, 2, 0).numpy()

    def apply(index: int, image: np.ndarray) -> Tensor:
        out = image.copy()
        out[row : row + s, col : col + s] = patch
        return TO_TENSOR(out)

    return apply


def blended_trigger(attack: Attack, poisoned: PoisonedSet, shape: tuple[int, int, int]) -> PerSample:
    h, w, c = shape
    pattern = attack.blend_image(c, h, w).permute(1, 2, 0).numpy()
    keep, mix = np.float32(1 - attack.params.alpha), np.float32(attack.params.alpha)

    def apply(index: int, image: np.ndarray) -> Tensor:
        return TO_TENSOR(as_uint8(keep * as_float(image) + mix * pattern))

    return apply


def adaptive_patch_trigger(attack: Attack, poisoned: PoisonedSet, shape: tuple[int, int, int]) -> PerSample:
    h, w, c = shape
    marks, masks = attack.patches(c, h, w)
    boxes = []
    for j, alpha in enumerate(attack.params.alphas):
        rows = torch.nonzero(masks[j, 0].any(1)).flatten()
        cols = torch.nonzero(masks[j, 0].any(0)).flatten()
        r, cc = slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)
        weight = (alpha * masks[j, :, r, cc]).permute(1, 2, 0).numpy().astype(np.float32)
        boxes.append((r, cc, marks[j, :, r, cc].permute(1, 2, 0).numpy(), weight))
    # poison_train gives the i-th poisoned (and, separately, the i-th cover) sample patch i mod k.
    which = {index: rank % len(boxes) for group in (poisoned.poisoned_index, poisoned.cover_index)
             for rank, index in enumerate(group.tolist())}  # fmt: skip

    def apply(index: int, image: np.ndarray) -> Tensor:
        rows, cols, mark, alpha = boxes[which[index]]
        out = image.copy()
        region = as_float(out[rows, cols])
        out[rows, cols] = as_uint8(region + alpha * (mark - region))
        return TO_TENSOR(out)

    return apply


def wanet_trigger(attack: Attack, poisoned: PoisonedSet, shape: tuple[int, int, int]) -> PerSample:
    if poisoned.cover_index.numel():
        raise BenchError("wanet: noise-mode samples (cross_ratio > 0) carry fresh random noise; "
                         "the per-sample path covers the default cross_ratio 0")  # fmt: skip
    grid = attack.warp_grid(shape[0], shape[1], torch.device("cpu"))

    def apply(index: int, image: np.ndarray) -> Tensor:
        x = TO_TENSOR(image).unsqueeze(0)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True).squeeze(0)

    return apply


def batt_trigger(attack: Attack, poisoned: PoisonedSet, shape: tuple[int, int, int]) -> PerSample:
    h, w, c = shape
    one = torch.ones(1)
    theta = affine_theta(one * attack.params.angle, torch.zeros(1, 2), one, h, w)
    grid = F.affine_grid(theta, [1, c, h, w], align_corners=False)

    def apply(index: int, image: np.ndarray) -> Tensor:
        x = TO_TENSOR(image).unsqueeze(0)
        return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False).squeeze(0)

    return apply


@dataclass(frozen=True)
class Reference:
    """How a toolkit triggers one image of an attack, and whether it lands on the same uint8 values."""

    build: Callable[[Attack, PoisonedSet, tuple[int, int, int]], PerSample]
    uint8_exact: bool


REFERENCES: dict[str, Reference] = {
    "badnets": Reference(patch_trigger, True),
    "physical_ba": Reference(patch_trigger, True),
    "blended": Reference(blended_trigger, True),
    "adaptive_patch": Reference(adaptive_patch_trigger, True),
    "wanet": Reference(wanet_trigger, False),
    "batt": Reference(batt_trigger, True),
}


# --------------------------------------------------------------------------- the two epoch streams


class ToolkitPoisonedDataset(Dataset):
    """A poisoned training set as the toolkits keep it: stored uint8 arrays, trigger in ``__getitem__``."""

    def __init__(self, arrays: np.ndarray, labels: list[int], triggered: frozenset[int], trigger: PerSample) -> None:
        self.arrays = arrays
        self.labels = labels
        self.triggered = triggered
        self.trigger = trigger

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.arrays[index]
        x = self.trigger(index, image) if index in self.triggered else TO_TENSOR(image)
        return x, self.labels[index]


def as_stored_arrays(images: Tensor) -> np.ndarray:
    """uint8 N,C,H,W -> N,H,W,C numpy, the layout torchvision-style datasets keep in memory."""
    return np.ascontiguousarray(images.cpu().permute(0, 2, 3, 1).numpy())


def harness_poison(attack: Attack, train: ImageSet, rate: float, target: int, seed: int) -> PoisonedSet:
    """The harness's poisoning of ``train``, drawn from the same generator every time."""
    return attack.poison_train(train, rate, target, generator(seed, "benchmark-poison"))


@dataclass
class EpochSetup:
    """One attack's poisoned epoch, ready to stream both ways."""

    attack: Attack
    train: ImageSet  # clean, on the CPU (where the harness poisons)
    rate: float
    target: int
    seed: int
    poisoned: PoisonedSet
    dataset: ToolkitPoisonedDataset

    def poison(self) -> PoisonedSet:
        return harness_poison(self.attack, self.train, self.rate, self.target, self.seed)


def require_reference(name: str) -> Reference:
    if name not in REFERENCES:
        raise BenchError(f"attack {name!r} has no per-sample reference path here (covered: {', '.join(sorted(REFERENCES))})")
    return REFERENCES[name]


def epoch_setup(name: str, attack: Attack, train: ImageSet, rate: float, target: int, seed: int = 0) -> EpochSetup:
    """Poison once (for the indices and labels) and build the toolkit-style dataset over the same set."""
    reference = require_reference(name)
    poisoned = harness_poison(attack, train, rate, target, seed)
    triggered = torch.cat([poisoned.poisoned_index, poisoned.cover_index]).tolist()
    shape = (train.x.shape[2], train.x.shape[3], train.x.shape[1])
    dataset = ToolkitPoisonedDataset(as_stored_arrays(train.x), poisoned.train.y.tolist(), frozenset(triggered),
                                     reference.build(attack, poisoned, shape))  # fmt: skip
    return EpochSetup(attack, train, rate, target, seed, poisoned, dataset)


def batched_epoch(setup: EpochSetup, batch: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """The harness: poison the uint8 set once, move it to the device, ``to_float`` per batch."""
    poisoned = setup.poison().train
    x, y = poisoned.x.to(device), poisoned.y.to(device)
    for start in range(0, x.shape[0], batch):
        yield to_float(x[start : start + batch]), y[start : start + batch]


def per_sample_epoch(setup: EpochSetup, batch: int, device: torch.device, workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """The toolkits: a DataLoader over the poisoned dataset's ``__getitem__``, batches to the device.

    In this process it runs on one intra-op thread, as every DataLoader worker process does: on
    32-px images more threads only add synchronisation.
    """
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)
    try:
        # Workers are forked: the dataset's trigger is a closure, which a spawned worker could not unpickle.
        loader = DataLoader(setup.dataset, batch_size=batch, shuffle=False, num_workers=workers,
                            multiprocessing_context="fork" if workers else None)  # fmt: skip
        for x, y in loader:
            yield x.to(device), y.to(device)
    finally:
        torch.set_num_threads(threads)


def consume(stream: Iterator[tuple[Tensor, Tensor]]) -> int:
    return sum(int(x.shape[0]) for x, _ in stream)


@dataclass
class Agreement:
    max_diff_uint8: float  # largest |batched - per-sample| in uint8 steps
    uint8_mismatches: int  # values that round to a different uint8


def compare_epochs(name: str, setup: EpochSetup, batch: int, device: torch.device, workers: int = 0) -> Agreement:
    """Walk both streams side by side; raise if a batch differs beyond what the arithmetic allows."""
    exact = REFERENCES[name].uint8_exact
    tolerance = 0.0 if exact else HALF_STEP + FLOAT_SLACK
    worst, mismatches, seen = 0.0, 0, 0
    pairs = zip(batched_epoch(setup, batch, device), per_sample_epoch(setup, batch, device, workers), strict=True)
    for (xb, yb), (xs, ys) in pairs:
        if xb.shape != xs.shape or xb.dtype != xs.dtype or not torch.equal(yb, ys):
            raise BenchError(f"{name}: the two paths deliver different batches (shape, dtype or labels) at image {seen}")
        diff = float((xb - xs).abs().max())
        if diff > tolerance:
            raise BenchError(f"{name}: the per-sample path differs from the batched one by {diff * 255:.3f}/255 "
                             f"near image {seen} (allowed: {tolerance * 255:.3f}/255)")  # fmt: skip
        worst = max(worst, diff)
        mismatches += int((to_uint8(xb) != to_uint8(xs)).sum())
        seen += xb.shape[0]
    return Agreement(round(worst * 255, 4), mismatches)


# --------------------------------------------------------------------------- the benchmark


def fitted_attack(name: str, train: ImageSet, device: torch.device, seed: int = 0) -> Attack:
    """The attack with its default (paper) parameters, fitted on ``train``.

    Attacks that need a clean model in ``fit`` get an untrained one: trigger throughput does not
    depend on the model's accuracy, and fitting is not what is timed.
    """
    attack: Attack = ATTACKS.get(name)()

    def untrained_model() -> torch.nn.Module:
        return build_model("small_cnn", train.num_classes, train.x.shape[1]).to(device).eval()

    attack.fit(train, generator(seed, "benchmark", name), FitContext(device, train_clean_model=untrained_model))
    return attack


def measure_attack(name: str, setup: EpochSetup, args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """Check both paths agree (also the warm-up), then time one epoch of each."""
    agreement = compare_epochs(name, setup, args.batch_size, device, args.loader_workers)
    n = len(setup.train)
    batched_s = best_seconds(lambda: consume(batched_epoch(setup, args.batch_size, device)), device, args.repeats)
    per_sample_s = best_seconds(lambda: consume(per_sample_epoch(setup, args.batch_size, device, args.loader_workers)),
                                device, args.repeats)  # fmt: skip
    return {
        "attack": name,
        "triggered": len(setup.dataset.triggered),
        "batched_img_per_s": round(n / batched_s, 1),
        "per_sample_img_per_s": round(n / per_sample_s, 1),
        "ratio": round(per_sample_s / batched_s, 2),
        "batched_s": significant(batched_s),
        "per_sample_s": significant(per_sample_s),
        "max_diff_uint8": agreement.max_diff_uint8,
        "uint8_mismatches": agreement.uint8_mismatches,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", help="attacks to measure (default: every one with a per-sample path)")
    parser.add_argument("--images", type=int, default=None,
                        help="training images in the epoch, a fixed random subset (default: all 50,000)")  # fmt: skip
    parser.add_argument("--rate", type=float, default=0.1, help="poisoning rate (default 0.1)")
    parser.add_argument("--target", type=int, default=0, help="target label (default 0)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128, the paper's)")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    add_common_args(parser)
    return parser


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    names = args.attacks or [n for n in ATTACKS.names() if n in REFERENCES]
    for name in names:
        ATTACKS.get(name)  # an unknown name fails before any data is loaded
        require_reference(name)
    if not 0 < args.rate < 1 or args.batch_size < 1 or args.loader_workers < 0:
        raise BenchError("--rate must be in (0, 1), --batch-size >= 1 and --loader-workers >= 0")
    device = device_from_args(args)
    train = load_cifar10(args).train
    train = random_subset(train, args.images)
    where = describe_device(device)
    print(f"one epoch of {len(train):,} images, batches of {args.batch_size}, rate {args.rate}: batched on {where}, "
          f"per-sample through a DataLoader with {args.loader_workers} workers", flush=True)  # fmt: skip
    rows = []
    for name in names:
        setup = epoch_setup(name, fitted_attack(name, train, device), train, args.rate, args.target)
        rows.append({**measure_attack(name, setup, args, device), "device": where})
        row = rows[-1]
        print(f"  {name}: {row['batched_img_per_s']:,.0f} vs {row['per_sample_img_per_s']:,.0f} img/s "
              f"({row['ratio']:.1f}x), outputs agree", flush=True)  # fmt: skip
    note = ("ratio: per-sample epoch time / batched epoch time (both measured here, side by side). max_diff_uint8 and "
            "uint8_mismatches: how far the two paths' float images lie apart (0 = identical; WaNet keeps a "
            "float image per sample, the harness a uint8 one, so up to half a step).")  # fmt: skip
    report(rows, CSV_COLUMNS, CSV_COLUMNS, args.csv, note)
    return rows


def main(argv: list[str] | None = None) -> int:
    return script_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
