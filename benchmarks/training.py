"""Training and evaluation throughput of the classifiers, under the paper and the fast recipes.

Each (model, recipe) pair runs the harness's own training loop (:func:`bench.nn.train.train_classifier`:
uint8 CIFAR-10 on the device, batched augmentation, bf16 and channels_last on CUDA) for
``1 + --steps`` steps per repeat, after a ``--warmup`` run: the first step is not timed and its
FLOPs are counted (see ``benchmarks/common.py``), the others are timed. Then it evaluates the
10,000 test images (or ``--eval-images``) in the recipe config's evaluation batches. The table
gives images/s, GFLOP per image, achieved TFLOP/s and the share of the device's dense bf16 peak,
and two *estimates* extrapolated from the measured rate: the seconds per epoch over the
attacker's training split (the training set minus the config's holdout) and the training time
of the recipe's full epoch count.

    python benchmarks/training.py [--models small_cnn cifar_resnet18] [--recipes paper fast] [--csv FILE]

Recipes are read from ``configs/cifar10_paper.yaml`` (paper) and ``configs/fast_cifar_resnet18.yaml``
(fast), or from any grid YAML given as a path.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from bench.core.data import ImageSet
from bench.core.errors import BenchError
from bench.core.metrics import predict_labels
from bench.core.registry import MODELS
from bench.nn.train import TrainRecipe, train_classifier
from benchmarks.common import (
    COMPUTE_COLUMNS,
    COMPUTE_NOTE,
    add_common_args,
    best_seconds,
    compute_figures,
    describe_device,
    device_from_args,
    device_peak,
    load_cifar10,
    measure_steps,
    recipe_settings,
    report,
    script_main,
    seeded_model,
)

CSV_COLUMNS = ["model", "recipe", "precision", "batch_size", "epochs", "train_img_per_s", *COMPUTE_COLUMNS,
               "epoch_est_s", "train_est_s", "eval_img_per_s", "device"]  # fmt: skip


def training_runner(model: nn.Module, train: ImageSet, recipe: TrainRecipe, device: torch.device,
                    desc: str = "train") -> Callable[[int], nn.Module]:  # fmt: skip
    """``run(k)``: one epoch of ``train_classifier`` over exactly ``k`` batches of the recipe's size."""
    images = train.x.to(device)
    labels = train.y.to(device)
    one_epoch = replace(recipe, epochs=1)

    def run(steps: int) -> nn.Module:
        n = steps * recipe.batch_size
        if n > len(train):
            raise BenchError(f"{steps} steps of {recipe.batch_size} images need {n} images; the training set has {len(train)}")
        return train_classifier(model, images[:n], labels[:n], one_epoch, device, seed=0, desc=desc)

    return run


def precision_label(recipe: TrainRecipe, device: torch.device) -> str:
    return "bf16 autocast" if device.type == "cuda" and recipe.amp else "fp32"


def measure(model_name: str, recipe_name: str, args: argparse.Namespace, data, device: torch.device) -> dict:
    recipe, holdout, eval_batch = recipe_settings(recipe_name)
    train = data.train
    test = data.test.x[: args.eval_images] if args.eval_images else data.test.x
    n_train = len(train) - round(holdout * len(train))
    batch = recipe.batch_size
    model = seeded_model(model_name, train)
    run = training_runner(model, train, recipe, device, desc=f"{model_name} {recipe_name}")
    run(args.warmup)
    # A compiled model is traced on its first call; FlopCounterMode must not watch that trace.
    rate = measure_steps(run, args.steps, device, args.repeats, count_flops=not recipe.compile)
    img_per_s = batch / rate.seconds_per_step
    eval_s = best_seconds(lambda: predict_labels(model, test, device, eval_batch), device, args.repeats)
    epoch_s = (n_train // batch) * batch / img_per_s
    return {
        "model": model_name, "recipe": recipe_name, "precision": precision_label(recipe, device), "batch_size": batch,
        "epochs": recipe.epochs, "train_img_per_s": round(img_per_s, 1),
        **compute_figures(rate.flops_per_step, rate.seconds_per_step, batch, device_peak(device)),
        "epoch_est_s": round(epoch_s, 2), "train_est_s": round(epoch_s * recipe.epochs, 1),
        "eval_img_per_s": round(len(test) / eval_s, 1), "device": describe_device(device),
    }  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["small_cnn", "cifar_resnet18"], help="registered models")
    parser.add_argument("--recipes", nargs="+", default=["paper", "fast"], help="paper, fast, or grid YAML paths")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per repeat, after one untimed (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="steps of an untimed warm-up run (default 3)")
    parser.add_argument("--eval-images", type=int, default=None, help="test images evaluated (default: all 10,000)")
    add_common_args(parser)
    return parser


def run(args: argparse.Namespace) -> list[dict]:
    if args.steps < 1 or args.warmup < 1:
        raise BenchError(f"--steps and --warmup must be >= 1, got {args.steps} and {args.warmup}")
    for name in args.models:
        MODELS.get(name)
    for name in args.recipes:
        recipe_settings(name)  # a bad recipe fails before any data is loaded
    device = device_from_args(args)
    data = load_cifar10(args)
    rows = []
    for model_name in args.models:
        for recipe_name in args.recipes:
            rows.append(measure(model_name, recipe_name, args, data, device))
            print(f"  {model_name} / {recipe_name}: {rows[-1]['train_img_per_s']:,.0f} train img/s", flush=True)
    note = (f"{COMPUTE_NOTE}\nepoch_est_s and train_est_s are ESTIMATES, extrapolated from {args.steps} timed steps "
            "(best of the repeats) to the attacker's split and the recipe's epochs.")  # fmt: skip
    report(rows, CSV_COLUMNS, CSV_COLUMNS, args.csv, note)
    return rows


def main(argv: list[str] | None = None) -> int:
    return script_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
