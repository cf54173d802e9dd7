"""BA, ASR and RA as the field defines them.

- BA (benign accuracy): accuracy on the clean test set.
- ASR (attack success rate): share of poisoned test images classified as the target label,
  computed only over test images whose true label is *not* the target (a target-class image
  "classified as the target" says nothing about the backdoor).
- RA (robust accuracy): share of those poisoned images still classified as their true label.
All three are percentages.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from bench.core.device import to_float

Predictor = Callable[[Tensor], Tensor]


# uint8 test sets up to this size move to the device in one copy; a copy per batch from pageable
# host memory would stall the host once per batch.
DEVICE_COPY_MAX_BYTES = 2**30


@torch.no_grad()
def predict_labels(predict: Predictor, images: Tensor, device: torch.device, batch_size: int = 1024) -> Tensor:
    """Arg-max labels of ``predict`` (images in [0, 1] -> logits) over uint8 ``images``, on the CPU.

    Labels stay on the device until the end: one host synchronisation per call, not per batch.
    """
    if images.numel() * images.element_size() <= DEVICE_COPY_MAX_BYTES:
        images = images.to(device, non_blocking=True)
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = to_float(images[start : start + batch_size].to(device, non_blocking=True))
        out.append(predict(x).argmax(1))
    return torch.cat(out).cpu() if out else torch.empty(0, dtype=torch.int64)


def percent(hits: Tensor) -> float:
    return float(hits.double().mean().item() * 100) if hits.numel() else float("nan")


def backdoor_metrics(
    predict: Predictor,
    clean_x: Tensor,
    clean_y: Tensor,
    poisoned_x: Tensor,
    poisoned_true_y: Tensor,
    target: int,
    device: torch.device,
    batch_size: int = 1024,
) -> dict[str, float]:
    """BA on (clean_x, clean_y); ASR and RA on poisoned images whose true label is not ``target``."""
    if bool((poisoned_true_y == target).any()):
        raise ValueError("the ASR set must not contain target-class samples")
    clean_pred = predict_labels(predict, clean_x, device, batch_size)
    poison_pred = predict_labels(predict, poisoned_x, device, batch_size)
    return {
        "ba": percent(clean_pred == clean_y),
        "asr": percent(poison_pred == target),
        "ra": percent(poison_pred == poisoned_true_y),
    }
