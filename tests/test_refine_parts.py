"""REFINE's building blocks on tiny tensors: the derangement, the output mapping, SupCon."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.core.seeding import generator
from bench.nn.losses import supcon_loss
from defenses.refine import derangement, remap, unmap


@pytest.mark.parametrize("k", range(2, 101))
def test_derangement_is_a_permutation_without_fixed_point(k: int) -> None:
    perm = derangement(k, generator(k, "test"))
    assert sorted(perm.tolist()) == list(range(k))
    assert not (perm == torch.arange(k)).any()


def test_derangement_is_stable_per_seed_and_varies_across_seeds() -> None:
    for k in (2, 3, 10, 100):
        assert torch.equal(derangement(k, generator(7, "perm")), derangement(k, generator(7, "perm")))
    draws = {tuple(derangement(10, generator(seed, "perm")).tolist()) for seed in range(20)}
    assert len(draws) > 10  # 1,334,961 derangements of 10: repeats would mean a broken draw
    assert derangement(2, generator(3, "perm")).tolist() == [1, 0]  # the only one for K = 2


def test_derangement_rejects_a_single_class() -> None:
    from bench.core.errors import BenchError

    with pytest.raises(BenchError, match="at least 2 classes"):
        derangement(1, generator(0))


def test_remap_moves_score_j_to_position_pi_j_and_unmap_inverts_it() -> None:
    torch.manual_seed(0)
    perm = derangement(10, generator(1, "perm"))
    p = torch.rand(5, 10).softmax(1)
    mapped = remap(p, perm)
    for j in range(10):
        assert torch.equal(mapped[:, perm[j]], p[:, j])
    assert torch.equal(unmap(mapped, perm), p)
    assert torch.equal(remap(unmap(p, perm), perm), p)
    assert torch.equal(mapped.argmax(1), perm[p.argmax(1)])
    # Softmax commutes with the mapping: remapping logits is remapping probabilities.
    logits = torch.randn(5, 10)
    assert torch.allclose(remap(logits, perm).softmax(1), remap(logits.softmax(1), perm))


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_supcon_matches_a_hand_computed_value_on_four_samples() -> None:
    # Unit vectors at 0, 60, 180 and 270 degrees; labels [a, a, b, b]; temperature 0.5, so the
    # scaled similarities are 2 * cos(angle between them):
    #   s01 = 2cos60 = 1, s02 = 2cos180 = -2, s03 = 2cos270 = 0,
    #   s12 = 2cos120 = -1, s13 = 2cos210 = -sqrt(3), s23 = 2cos90 = 0.
    z = torch.tensor([unit(0), unit(60), unit(180), unit(270)])
    labels = torch.tensor([0, 0, 1, 1])
    r3 = math.sqrt(3)
    per_anchor = [
        1 - math.log(math.exp(1) + math.exp(-2) + math.exp(0)),  # anchor 0, positive 1
        1 - math.log(math.exp(1) + math.exp(-1) + math.exp(-r3)),  # anchor 1, positive 0
        0 - math.log(math.exp(-2) + math.exp(-1) + math.exp(0)),  # anchor 2, positive 3
        0 - math.log(math.exp(0) + math.exp(-r3) + math.exp(0)),  # anchor 3, positive 2
    ]
    expected = -sum(per_anchor) / 4
    assert supcon_loss(z, labels, temperature=0.5).item() == pytest.approx(expected, rel=1e-5)
    # base_temperature only rescales by temperature / base_temperature.
    assert supcon_loss(z, labels, 0.5, base_temperature=1.0).item() == pytest.approx(expected / 2, rel=1e-5)


def reference_supcon(z: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    """Khosla et al.'s formula, one anchor at a time, over a flat list of (vector, label)."""
    total, anchors = 0.0, 0
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / t) for a in others)
        total += -sum(float(z[i] @ z[p]) / t - math.log(denominator) for p in positives) / len(positives)
        anchors += 1
    return total / anchors


def test_supcon_with_two_views_equals_the_formula_over_all_views() -> None:
    torch.manual_seed(0)
    z1 = F.normalize(torch.randn(6, 5), dim=1)
    z2 = F.normalize(torch.randn(6, 5), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    got = supcon_loss(torch.stack([z1, z2], 1), labels, temperature=0.07).item()
    want = reference_supcon(torch.cat([z1, z2]), torch.cat([labels, labels]), 0.07)
    assert got == pytest.approx(want, rel=1e-4)


def test_supcon_skips_anchors_without_positive_and_has_finite_gradients() -> None:
    torch.manual_seed(1)
    z = F.normalize(torch.randn(5, 8), dim=1).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 2, 3])  # labels 1, 2 and 3 occur once
    loss = supcon_loss(z, labels, temperature=0.07)
    assert loss.item() == pytest.approx(reference_supcon(z.detach(), labels, 0.07), rel=1e-4)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    lonely = supcon_loss(z.detach(), torch.arange(5), temperature=0.07)
    assert lonely.item() == 0.0


def test_supcon_rewards_clustering_by_label() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([unit(0), unit(5), unit(180), unit(185)])
    mixed = torch.tensor([unit(0), unit(180), unit(5), unit(185)])
    assert supcon_loss(clustered, labels).item() < supcon_loss(mixed, labels).item()
