"""Poisoning throughput of every registered attack: the batched path against a per-sample one.

Batched path (what the harness does): the 50,000 CIFAR-10 training images stay one uint8 tensor
on the device; the trigger runs on whole chunks in a few tensor operations, and the output is
float in [0, 1], ready for the model.

Per-sample reference path (what a typical ``__getitem__`` pipeline does): the images are stored
as H x W x C uint8 arrays; for each index the array becomes a PIL image, the trigger is applied as
a PIL -> PIL transform (the image converted to a tensor, the attack's trigger run on a batch of
one, converted back to PIL) and ``to_tensor`` makes the float tensor. It runs on the CPU, as in a
DataLoader worker, in the same process on the same images, so the ratio is measured side by side.
It is slow, so ``--limit`` images are timed and its throughput extrapolated to the whole set.

    python benchmarks/poisoning.py [--csv FILE] [--limit 5000] [--attacks badnets wanet]

Attack fitting (drawing a WaNet field, say) happens once before timing and is not counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

from attacks.base import Attack, FitContext
from bench.core.data import ImageSet
from bench.core.device import to_float
from bench.core.models import build_model
from bench.core.registry import ATTACKS
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

CSV_COLUMNS = ["attack", "batched_img_per_s", "per_sample_img_per_s", "ratio", "device"]

# On a CPU, a chunk whose float copy fits in the per-core L2 cache runs several times faster than
# one that streams through main memory; on a GPU, bigger chunks only mean fewer kernel launches.
CPU_CHUNK_BYTES = 3 * 2**19
GPU_CHUNK_IMAGES = 16384


def auto_chunk(device: torch.device, image_shape: tuple[int, ...]) -> int:
    """Images per chunk of the batched path on ``device`` for images of ``image_shape`` (C, H, W)."""
    if device.type == "cuda":
        return GPU_CHUNK_IMAGES
    return max(8, CPU_CHUNK_BYTES // (4 * int(np.prod(image_shape))))


# --------------------------------------------------------------------------- the two paths


def batched_poison(attack: Attack, images: Tensor, chunk: int, keep: int = 0) -> Tensor:
    """The trigger over uint8 ``images`` in chunks, output float in [0, 1]; returns the first ``keep``."""
    kept: list[Tensor] = []
    for start in range(0, images.shape[0], chunk):
        out = to_float(attack.apply(images[start : start + chunk]))
        if start < keep:
            kept.append(out[: keep - start])
    return torch.cat(kept) if kept else images.new_empty((0, *images.shape[1:]), dtype=torch.float32)


def as_stored_arrays(images: Tensor) -> np.ndarray:
    """uint8 N,C,H,W -> N,H,W,C numpy, the layout torchvision-style datasets keep in memory."""
    return np.ascontiguousarray(images.cpu().permute(0, 2, 3, 1).numpy())


def pil_trigger(attack: Attack, image: Image.Image) -> Image.Image:
    """The attack as a per-sample PIL -> PIL transform: tensor, trigger on a batch of one, PIL."""
    x = TF.pil_to_tensor(image).unsqueeze(0)
    out = attack.apply(x)[0].permute(1, 2, 0).numpy()
    return Image.fromarray(out[:, :, 0] if out.shape[2] == 1 else out)


def per_sample_poison(attack: Attack, arrays: np.ndarray) -> Tensor:
    """``__getitem__`` one index at a time: stored array -> PIL image -> trigger -> float tensor."""
    out = []
    for array in arrays:
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        out.append(TF.to_tensor(pil_trigger(attack, image)))
    return torch.stack(out)


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


def measure_attack(
    attack: Attack, images: Tensor, arrays: np.ndarray, device: torch.device, chunk: int, repeats: int
) -> dict[str, object]:
    """Time both paths on the same images; check that they produce the same tensors."""
    limit = arrays.shape[0]
    batched = batched_poison(attack, images, chunk, keep=limit).cpu()  # also a warm-up
    deterministic = torch.equal(batched, batched_poison(attack, images[:limit], chunk, keep=limit).cpu())
    batched_s = best_seconds(lambda: batched_poison(attack, images, chunk), device, repeats)
    per_sample_poison(attack, arrays[: min(limit, 16)])  # warm-up
    outputs: list[Tensor] = []
    per_sample_s = best_seconds(lambda: outputs.append(per_sample_poison(attack, arrays)), torch.device("cpu"), repeats)
    reference = outputs[-1]
    batched_rate = images.shape[0] / batched_s
    per_sample_rate = limit / per_sample_s
    return {
        "batched_img_per_s": round(batched_rate, 1),
        "per_sample_img_per_s": round(per_sample_rate, 1),
        "ratio": round(batched_rate / per_sample_rate, 2),
        "batched_s": batched_s,
        "per_sample_s_all": images.shape[0] / per_sample_rate,
        "max_abs_diff": float((reference - batched).abs().max()) if deterministic else "random trigger",
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", help="attacks to measure (default: every registered attack)")
    parser.add_argument("--images", type=int, default=None, help="images for the batched path (default: all 50,000)")
    parser.add_argument("--limit", type=int, default=5000,
                        help="images timed on the per-sample path; its rate is extrapolated (default 5000)")  # fmt: skip
    parser.add_argument("--chunk", type=int, default=None, help="images per batched chunk (default: by device)")
    add_common_args(parser)
    return parser


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    names = args.attacks or ATTACKS.names()
    for name in names:
        ATTACKS.get(name)  # an unknown name fails before any data is loaded
    device = device_from_args(args)
    train = load_cifar10(args).train
    n = len(train) if args.images is None else max(1, min(args.images, len(train)))
    limit = max(1, min(args.limit, n))
    images = train.x[:n].to(device)
    arrays = as_stored_arrays(train.x[:limit])
    chunk = args.chunk or auto_chunk(device, tuple(train.x.shape[1:]))
    where = describe_device(device)
    print(f"batched: {n:,} images on {where}, chunks of {chunk}; per-sample: {limit:,} images on "
          f"{describe_device(torch.device('cpu'))}" + (f", rate extrapolated to {n:,}" if limit < n else ""),
          flush=True)  # fmt: skip
    rows = []
    for name in names:
        attack = fitted_attack(name, train, device)
        row = {"attack": name, **measure_attack(attack, images, arrays, device, chunk, args.repeats), "device": where}
        rows.append(row)
        print(f"  {name}: {row['batched_img_per_s']:,.0f} vs {row['per_sample_img_per_s']:,.0f} img/s "
              f"({row['ratio']:.1f}x)", flush=True)  # fmt: skip
    note = f"per_sample_s_all is extrapolated from {limit:,} timed images to {n:,}." if limit < n else ""
    report(rows, [*CSV_COLUMNS[:4], "batched_s", "per_sample_s_all", "max_abs_diff", "device"], CSV_COLUMNS, args.csv, note)
    return rows


def main(argv: list[str] | None = None) -> int:
    return script_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
