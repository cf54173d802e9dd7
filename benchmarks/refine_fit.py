"""REFINE fitting throughput: images per second through its U-Net training step, per width c.

One step is REFINE's own (``defenses/refine.py``): batched augmentation, the frozen model's
pseudo-labels, the U-Net, the frozen model again on the transformed images, cross-entropy on the
remapped output plus the supervised contrastive term, and the U-Net's update. ``--steps`` steps
are timed after a one-step warm-up; from the rate come the seconds per epoch over REFINE's benign
split (``benign_fraction`` of the 50,000 training images) and of its full epoch count: estimates,
extrapolated from a few steps. The frozen model is an untrained ResNet-18: the cost of a step does
not depend on its weights.

    python benchmarks/refine_fit.py [--widths 64] [--csv FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.core.models import build_model
from bench.core.registry import DEFENSES
from bench.core.seeding import generator
from benchmarks.common import (
    add_common_args,
    best_seconds,
    describe_device,
    device_from_args,
    load_cifar10,
    report,
    script_main,
)

CSV_COLUMNS = ["defense", "width", "batch_size", "fit_img_per_s", "epoch_s", "epochs", "fit_est_s", "device"]


def measure(width: int, args: argparse.Namespace, data, device: torch.device) -> dict:
    train = data.train
    model = build_model(args.model, train.num_classes, train.x.shape[1]).to(device).eval()
    reference = DEFENSES.get("refine")(width=width)  # the paper's settings for everything else
    batch = args.batch_size or reference.batch_size
    n_benign = round(reference.benign_fraction * len(train))

    def fit(steps: int) -> None:
        defense = DEFENSES.get("refine")(width=width, epochs=1, batch_size=batch)
        defense.bind(model, device, seed=0)
        defense.fit(train.subset(torch.arange(min(steps * batch, len(train)))), generator(0, "benchmark-refine"))

    fit(1)  # warm-up
    seconds = best_seconds(lambda: fit(args.steps), device, args.repeats)
    rate = min(args.steps * batch, len(train)) / seconds
    epoch_s = (n_benign // batch) * batch / rate
    return {
        "defense": "refine", "width": width, "batch_size": batch, "fit_img_per_s": round(rate, 1),
        "epoch_s": round(epoch_s, 2), "epochs": reference.epochs, "fit_est_s": round(epoch_s * reference.epochs, 1),
        "device": describe_device(device),
    }  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", nargs="+", type=int, default=[64], help="U-Net base widths c (paper: 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: REFINE's (256)")
    parser.add_argument("--model", default="cifar_resnet18", help="the frozen classifier (default cifar_resnet18)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat (default 10)")
    add_common_args(parser)
    return parser


def run(args: argparse.Namespace) -> list[dict]:
    DEFENSES.get("refine")
    device = device_from_args(args)
    data = load_cifar10(args)
    rows = []
    for width in args.widths:
        rows.append(measure(width, args, data, device))
        print(f"  refine c={width}: {rows[-1]['fit_img_per_s']:,.1f} img/s", flush=True)
    report(rows, CSV_COLUMNS, CSV_COLUMNS, args.csv,
           f"epoch_s and fit_est_s are extrapolated from {args.steps} timed steps to REFINE's benign split and epochs.")
    return rows


def main(argv: list[str] | None = None) -> int:
    return script_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
