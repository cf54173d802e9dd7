"""Spatial attacks: the batched affine helpers, BATT's rotation trigger and PhysicalBA's transforms."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from attacks.badnets import BadNets
from attacks.batt import BATT
from attacks.physical_ba import PhysicalBA
from attacks.transforms import affine_theta, random_affine, random_brightness, rotate, warp_affine
from bench.core.device import to_float
from bench.core.errors import BenchError


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("angle", [16.0, -10.0, 90.0])
def test_rotate_matches_torchvision(size: tuple[int, int], angle: float) -> None:
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    expected = TF.rotate(x, angle, interpolation=InterpolationMode.BILINEAR)
    torch.testing.assert_close(rotate(x, angle), expected, atol=1e-5, rtol=0)


def test_affine_matches_torchvision_affine_per_image() -> None:
    """Each image gets its own (angle, shift, scale); torchvision's ``affine`` counts angles clockwise."""
    h, w = 28, 36
    x = torch.rand(3, 1, h, w, generator=torch.Generator().manual_seed(1))
    params = [(7.0, 3, -2, 0.85), (-9.0, -4, 1, 0.9), (0.0, 0, 0, 0.8)]
    theta = affine_theta(
        torch.tensor([p[0] for p in params]),
        torch.tensor([[p[1] / w, p[2] / h] for p in params]),
        torch.tensor([p[3] for p in params]),
        h,
        w,
    )
    out = warp_affine(x, theta)
    for i, (angle, tx, ty, scale) in enumerate(params):
        expected = TF.affine(x[i : i + 1], angle=-angle, translate=[tx, ty], scale=scale, shear=[0.0, 0.0],
                             interpolation=InterpolationMode.BILINEAR)  # fmt: skip
        torch.testing.assert_close(out[i : i + 1], expected, atol=1e-5, rtol=0)


def test_batt_rotates_real_images_by_the_configured_angle(cifar10) -> None:
    x = cifar10.test.x[:8]
    out = BATT(angle=30).apply(to_float(x))
    torch.testing.assert_close(out, TF.rotate(to_float(x), 30.0, interpolation=InterpolationMode.BILINEAR),
                               atol=1e-5, rtol=0)  # fmt: skip
    # Black corners: the rotated image does not cover them.
    assert float(out[:, :, 0, 0].abs().max()) == 0.0
    assert not torch.allclose(out, BATT(angle=-30).apply(to_float(x)))


def test_batt_rejects_a_zero_angle() -> None:
    with pytest.raises(BenchError, match="angle"):
        BATT(angle=0)


def test_physical_ba_trigger_is_the_badnets_patch(mnist) -> None:
    x = mnist.test.x[:10]
    assert torch.equal(PhysicalBA(size=4).apply(x), BadNets(size=4).apply(x))


def test_physical_transforms_draw_parameters_per_image(mnist) -> None:
    """Ten copies of one digit come out ten different ways; the same generator seed repeats them."""
    x = to_float(mnist.train.x[:1]).repeat(10, 1, 1, 1)
    attack = PhysicalBA()
    a = attack.train_augment(x, torch.Generator().manual_seed(0))
    b = attack.train_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    distinct = {tuple(img.flatten().tolist()) for img in a}
    assert len(distinct) == 10
    # Scale 0.8-0.9 shrinks every image: a white image keeps 64-81% of its area, the rest is black.
    white = attack.train_augment(torch.ones(50, 3, 32, 32), torch.Generator().manual_seed(1))
    covered = white.mean((1, 2, 3))
    assert float(covered.max()) < 0.85 and float(covered.min()) > 0.4


def test_random_affine_respects_its_ranges() -> None:
    """A single bright pixel at the centre moves by at most the translation; with no shift it stays."""
    x = torch.zeros(64, 1, 33, 33)
    x[:, :, 16, 16] = 1.0
    still = random_affine(x, torch.Generator().manual_seed(0), degrees=10, translate=0.0, scale=(0.8, 0.9))
    assert bool((still[:, :, 16, 16] > 0).all())
    moved = random_affine(x, torch.Generator().manual_seed(0), degrees=0, translate=0.1, scale=(1.0, 1.0))
    rows, cols = torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij")
    mass = moved[:, 0].sum((1, 2))
    cy = (moved[:, 0] * rows).sum((1, 2)) / mass
    cx = (moved[:, 0] * cols).sum((1, 2)) / mass
    assert float((cy - 16).abs().max()) <= 0.1 * 33 + 1e-4 and float((cx - 16).abs().max()) <= 0.1 * 33 + 1e-4
    assert float((cy - 16).abs().max()) > 1.0  # shifts are really drawn


def test_random_brightness_stays_within_the_jitter() -> None:
    x = torch.full((200, 3, 4, 4), 0.5)
    out = random_brightness(x, torch.Generator().manual_seed(0), 0.1)
    factor = out[:, 0, 0, 0] / 0.5
    assert float(factor.min()) >= 0.9 - 1e-6 and float(factor.max()) <= 1.1 + 1e-6
    assert float(factor.std()) > 0.03  # drawn per image, spread over the range


def test_physical_share_p_transforms_that_share_of_images(cifar10) -> None:
    x = to_float(cifar10.train.x[:200])
    assert torch.equal(PhysicalBA(p=0.0).train_augment(x, torch.Generator().manual_seed(0)), x)
    half = PhysicalBA(p=0.5).train_augment(x, torch.Generator().manual_seed(0))
    changed = (half != x).flatten(1).any(1).float().mean()
    assert 0.35 < float(changed) < 0.65
    with pytest.raises(BenchError, match="p"):
        PhysicalBA(p=1.5)
