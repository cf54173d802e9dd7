"""REFINE fitting throughput: images per second through its U-Net training step, per width c.

One step is REFINE's own (``Refine.fit`` in ``defenses/refine.py``, called unchanged): batched
augmentation, the frozen model's pseudo-labels, the U-Net, the frozen model again on the
transformed images, cross-entropy on the remapped output plus the supervised contrastive term,
and the U-Net's update. Each repeat fits ``1 + --steps`` steps; the first is not timed and its
FLOPs are counted (see ``benchmarks/common.py``), the others are timed. The table gives images/s,
GFLOP per image, achieved TFLOP/s and the share of the device's dense bf16 peak, the fit's mean
loss, and two *estimates* extrapolated from the measured rate: seconds per epoch over REFINE's
benign split (``benign_fraction`` of the 50,000 training images) and for its full epoch count.
The frozen model is an untrained ResNet-18: the cost of a step does not depend on its weights.

Precision: on CUDA the fit runs as configured (bf16 autocast, the defense's ``amp``). On a CPU
it runs in fp32; ``--cpu-bf16`` measures every width a second time with the defense's
``cpu_bf16: true`` -- the loss under CPU bf16 autocast, exactly the region the fit autocasts on
CUDA (the augmentation, backward and update stay outside, as there) -- and prints how far the
mean loss of the same steps (same seed, same batches) moved from fp32.

    python benchmarks/refine_fit.py [--widths 64] [--steps 10] [--cpu-bf16] [--csv FILE]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from bench.core.data import ImageSet
from bench.core.errors import BenchError
from bench.core.registry import DEFENSES, MODELS
from bench.core.seeding import generator
from benchmarks.common import (
    COMPUTE_COLUMNS,
    COMPUTE_NOTE,
    add_common_args,
    compute_figures,
    describe_device,
    device_from_args,
    device_peak,
    load_cifar10,
    measure_steps,
    report,
    script_main,
    seeded_model,
)

CSV_COLUMNS = ["defense", "width", "precision", "batch_size", "fit_img_per_s", *COMPUTE_COLUMNS, "loss",
               "epoch_est_s", "epochs", "fit_est_s", "device"]  # fmt: skip
CPU_BF16 = "bf16 (cpu autocast)"


def refine_fit_runner(width: int | None, batch: int, model: nn.Module, train: ImageSet, device: torch.device,
                      cpu_bf16: bool = False) -> Callable[[int], Any]:  # fmt: skip
    """``run(k)``: a one-epoch REFINE fit of exactly ``k`` steps of ``batch`` images; returns the defense."""

    def run(steps: int) -> Any:
        n = steps * batch
        if n > len(train):
            raise BenchError(f"{steps} steps of {batch} images need {n} images; the training set has {len(train)}")
        defense = DEFENSES.get("refine")(width=width, epochs=1, batch_size=batch, cpu_bf16=cpu_bf16)
        defense.bind(model, device, seed=0)
        defense.fit(train.subset(torch.arange(n)), generator(0, "benchmark-refine"))
        return defense

    return run


def precision_label(device: torch.device, cpu_bf16: bool) -> str:
    if device.type == "cuda":
        return "bf16 autocast" if DEFENSES.get("refine")().params.amp else "fp32"
    return CPU_BF16 if cpu_bf16 else "fp32"


def measure(width: int, cpu_bf16: bool, args: argparse.Namespace, train: ImageSet, device: torch.device) -> dict:
    model = seeded_model(args.model, train).to(device).eval()
    reference = DEFENSES.get("refine")(width=width)  # the paper's settings for everything else
    batch = args.batch_size or reference.params.batch_size
    n_benign = round(reference.params.benign_fraction * len(train))
    run = refine_fit_runner(width, batch, model, train, device, cpu_bf16)
    rate = measure_steps(run, args.steps, device, args.repeats)
    img_per_s = batch / rate.seconds_per_step
    epoch_s = (n_benign // batch) * batch / img_per_s
    return {
        "defense": "refine", "width": width, "precision": precision_label(device, cpu_bf16), "batch_size": batch,
        "fit_img_per_s": round(img_per_s, 1),
        **compute_figures(rate.flops_per_step, rate.seconds_per_step, batch, device_peak(device)),
        "loss": round(float(getattr(rate.result, "_fit_loss", float("nan"))), 5),
        "epoch_est_s": round(epoch_s, 2), "epochs": reference.params.epochs,
        "fit_est_s": round(epoch_s * reference.params.epochs, 1),
        "device": describe_device(device),
    }  # fmt: skip


def loss_differences(rows: list[dict], steps: int) -> list[str]:
    """For each width measured both ways: how far the bf16 mean loss lies from the fp32 one."""
    lines = []
    for row in rows:
        if row["precision"] != CPU_BF16:
            continue
        fp32 = next(r for r in rows if r["width"] == row["width"] and r["precision"] == "fp32")
        rel = abs(row["loss"] - fp32["loss"]) / abs(fp32["loss"])
        lines.append(f"c={row['width']}: mean loss of the same {steps} steps, fp32 {fp32['loss']:.5f} vs "
                     f"bf16 {row['loss']:.5f}: relative difference {rel:.2e}")  # fmt: skip
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", nargs="+", type=int, default=[64], help="U-Net base widths c (paper: 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: REFINE's (256)")
    parser.add_argument("--model", default="cifar_resnet18", help="the frozen classifier (default cifar_resnet18)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat, after one untimed (default 10)")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="on a CPU, also measure each width with the loss under bf16 autocast")  # fmt: skip
    add_common_args(parser)
    return parser


def run(args: argparse.Namespace) -> list[dict]:
    MODELS.get(args.model)
    DEFENSES.get("refine")
    if args.steps < 1:
        raise BenchError(f"--steps must be >= 1, got {args.steps}")
    device = device_from_args(args)
    if args.cpu_bf16 and device.type != "cpu":
        raise BenchError("--cpu-bf16 is for --device cpu; on CUDA the fit already runs under bf16 autocast")
    train = load_cifar10(args).train
    rows = []
    for width in args.widths:
        for cpu_bf16 in (False, True) if args.cpu_bf16 else (False,):
            rows.append(measure(width, cpu_bf16, args, train, device))
            row = rows[-1]
            print(f"  refine c={width} {row['precision']}: {row['fit_img_per_s']:,.1f} img/s, "
                  f"{row['achieved_tflops']} TFLOP/s", flush=True)  # fmt: skip
    note = "\n".join([
        COMPUTE_NOTE,
        f"loss: the fit's mean loss over its {1 + args.steps} steps. epoch_est_s and fit_est_s are ESTIMATES, "
        f"extrapolated from the {args.steps} timed steps to REFINE's benign split and epochs.",
        *loss_differences(rows, 1 + args.steps),
    ])  # fmt: skip
    report(rows, CSV_COLUMNS, CSV_COLUMNS, args.csv, note)
    return rows


def main(argv: list[str] | None = None) -> int:
    return script_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
