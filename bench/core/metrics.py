"""BA, ASR and RA as the field defines them.

- BA (benign accuracy): accuracy on the clean test set.
- ASR (attack success rate): share of poisoned test images classified as the target label,
  computed only over test images whose true label is *not* the target (a target-class image
  "classified as the target" says nothing about the backdoor).
- RA (robust accuracy): share of those poisoned images still classified as their true label.
All three are percentages.

Prediction runs in batches under ``torch.inference_mode()`` (no autograd bookkeeping at all) and,
on CUDA, under bf16 autocast unless ``amp`` is off (``eval_amp`` in a grid); on the CPU in fp32.
Labels and features stay on the device until the end: one host synchronisation per image set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from bench.core.device import autocast, to_float

Predictor = Callable[[Tensor], Tensor]
# Logits and the penultimate features they came from, in one pass (Defense.predict_with_features).
FeaturePredictor = Callable[[Tensor], tuple[Tensor, Tensor]]


# uint8 test sets up to this size move to the device in one copy; a copy per batch from pageable
# host memory would stall the host once per batch.
DEVICE_COPY_MAX_BYTES = 2**30


def float_batches(images: Tensor, device: torch.device, batch_size: int) -> Iterator[tuple[int, Tensor]]:
    """(start index, float batch in [0, 1] on ``device``) over uint8 ``images``."""
    if images.numel() * images.element_size() <= DEVICE_COPY_MAX_BYTES:
        images = images.to(device, non_blocking=True)
    for start in range(0, images.shape[0], batch_size):
        yield start, to_float(images[start : start + batch_size].to(device, non_blocking=True))


def predict_labels(predict: Predictor, images: Tensor, device: torch.device, batch_size: int = 1024,
                   amp: bool = True) -> Tensor:  # fmt: skip
    """Arg-max labels of ``predict`` (images in [0, 1] -> logits) over uint8 ``images``, on the CPU
    (``amp``: bf16 autocast on CUDA)."""
    with torch.inference_mode(), autocast(device, cuda_bf16=amp):
        out = [predict(x).argmax(1) for _, x in float_batches(images, device, batch_size)]
    # Concatenated outside inference mode: the caller gets an ordinary tensor.
    return torch.cat(out).cpu() if out else torch.empty(0, dtype=torch.int64)


def predict_labels_and_features(
    predict: FeaturePredictor, images: Tensor, keep: Tensor, device: torch.device, batch_size: int = 1024,
    amp: bool = True,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Like :func:`predict_labels`, plus the features of the images at the sorted indices ``keep``
    (rows in the order of ``keep``, float32 on the CPU), taken from the same forward passes."""
    labels, kept = [], []
    keep = keep.to(device)
    with torch.inference_mode(), autocast(device, cuda_bf16=amp):
        for start, x in float_batches(images, device, batch_size):
            logits, features = predict(x)
            labels.append(logits.argmax(1))
            rows = keep[(keep >= start) & (keep < start + x.shape[0])] - start
            if rows.numel():
                kept.append(features[rows].flatten(1).float())
    if not labels:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, 0)
    return torch.cat(labels).cpu(), torch.cat(kept).cpu() if kept else torch.empty(0, 0)


def percent(hits: Tensor) -> float:
    return float(hits.double().mean().item() * 100) if hits.numel() else float("nan")


def _check_asr_set(poisoned_true_y: Tensor, target: int) -> None:
    if bool((poisoned_true_y == target).any()):
        raise ValueError("the ASR set must not contain target-class samples")


def _rates(clean_pred: Tensor, clean_y: Tensor, poison_pred: Tensor, poisoned_true_y: Tensor, target: int) -> dict[str, float]:
    return {
        "ba": percent(clean_pred == clean_y),
        "asr": percent(poison_pred == target),
        "ra": percent(poison_pred == poisoned_true_y),
    }


def backdoor_metrics(
    predict: Predictor,
    clean_x: Tensor,
    clean_y: Tensor,
    poisoned_x: Tensor,
    poisoned_true_y: Tensor,
    target: int,
    device: torch.device,
    batch_size: int = 1024,
    amp: bool = True,
) -> dict[str, float]:
    """BA on (clean_x, clean_y); ASR and RA on poisoned images whose true label is not ``target``."""
    _check_asr_set(poisoned_true_y, target)
    clean_pred = predict_labels(predict, clean_x, device, batch_size, amp)
    poison_pred = predict_labels(predict, poisoned_x, device, batch_size, amp)
    return _rates(clean_pred, clean_y, poison_pred, poisoned_true_y, target)


@dataclass
class Evaluation:
    """:func:`backdoor_metrics` plus the features of the sampled clean and poisoned images."""

    metrics: dict[str, float]
    clean_features: Tensor
    poisoned_features: Tensor


def evaluate_with_features(
    predict: FeaturePredictor,
    clean_x: Tensor,
    clean_y: Tensor,
    poisoned_x: Tensor,
    poisoned_true_y: Tensor,
    target: int,
    device: torch.device,
    batch_size: int,
    clean_keep: Tensor,
    poisoned_keep: Tensor,
    amp: bool = True,
) -> Evaluation:
    """:func:`backdoor_metrics` from the same batches in the same order (so a defense that draws
    random numbers while predicting draws the same ones), keeping the features of the images at
    ``clean_keep`` and ``poisoned_keep``: the t-SNE sample costs no extra forward pass."""
    _check_asr_set(poisoned_true_y, target)
    clean_pred, clean_f = predict_labels_and_features(predict, clean_x, clean_keep, device, batch_size, amp)
    poison_pred, poison_f = predict_labels_and_features(predict, poisoned_x, poisoned_keep, device, batch_size, amp)
    return Evaluation(_rates(clean_pred, clean_y, poison_pred, poisoned_true_y, target), clean_f, poison_f)
