"""Losses shared by defenses: the supervised contrastive loss (Khosla et al., 2020).

For anchors ``i`` over all samples and views, with positives ``P(i)`` (other samples/views with
the same label) and contrast set ``A(i)`` (every sample/view except ``i`` itself):

    L = -(t / t_base) * mean_i [ 1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t) ) ]

The features must already be L2-normalised (``z_i.z_p`` is then a cosine similarity). An anchor
with no positive (a label that occurs once, with one view) has an undefined term: it is left out
of the mean instead of turning the loss into NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bench.core.device import full_precision


def supcon_loss(
    features: Tensor,
    labels: Tensor,
    temperature: float = 0.07,
    base_temperature: float | None = None,
) -> Tensor:
    """Supervised contrastive loss of ``features`` (N, D) or (N, V, D views) with labels (N,).

    ``base_temperature`` (default: ``temperature``) only rescales the loss, as in the original
    formulation; all views of a sample share its label and count as its positives. Computed in
    fp32 even under autocast: at temperature 0.07 a bf16 similarity (3 significant digits) would
    move the logits by several hundredths.
    """
    with full_precision(features):
        return _supcon(features, labels, temperature, temperature if base_temperature is None else base_temperature)


def _supcon(features: Tensor, labels: Tensor, temperature: float, base: float) -> Tensor:
    if features.dim() == 2:
        features = features.unsqueeze(1)
    if features.dim() != 3 or labels.shape != (features.shape[0],):
        raise ValueError(f"features must be (N, D) or (N, V, D) with N labels, got {tuple(features.shape)}")
    n, views, _ = features.shape
    # View-major order: all samples' first view, then all second views (labels repeat per view).
    z = features.transpose(0, 1).reshape(n * views, -1).float()
    lab = labels.repeat(views)
    logits = z @ z.T / temperature
    self_mask = torch.eye(n * views, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    # Subtracting the row maximum leaves every log-ratio unchanged and keeps exp() finite.
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (lab[:, None] == lab[None, :]) & ~self_mask
    count = positives.sum(1)
    mean_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1) / count.clamp(min=1)
    # Averaged over anchors that have a positive (0 when none has), without a host sync.
    has_positive = (count > 0).to(mean_log_prob.dtype)
    return -(temperature / base) * (mean_log_prob * has_positive).sum() / has_positive.sum().clamp(min=1)
