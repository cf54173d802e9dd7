"""Spatial attacks: the batched affine helpers, BATT's rotation trigger and PhysicalBA's transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from attacks.badnets import BadNets
from attacks.batt import BATT
from attacks.physical_ba import PhysicalBA
from attacks.transforms import affine_theta, random_affine, random_brightness, rotate, warp_affine
from bench.core.data import ImageSet, stratified_split
from bench.core.device import to_float, to_uint8
from bench.core.errors import BenchError
from bench.nn.augment import random_flip, shift_images


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("angle", [16.0, -10.0, 90.0])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_rotate_matches_torchvision(size: tuple[int, int], angle: float, mode: str) -> None:
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    expected = TF.rotate(x, angle, interpolation=InterpolationMode(mode))
    torch.testing.assert_close(rotate(x, angle, mode), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_affine_matches_torchvision_affine_per_image(mode: str) -> None:
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
    out = warp_affine(x, theta, mode)
    for i, (angle, tx, ty, scale) in enumerate(params):
        expected = TF.affine(x[i : i + 1], angle=-angle, translate=[tx, ty], scale=scale, shear=[0.0, 0.0],
                             interpolation=InterpolationMode(mode))  # fmt: skip
        torch.testing.assert_close(out[i : i + 1], expected, atol=1e-5, rtol=0)


def pil_rotate(x: torch.Tensor, angle: float) -> torch.Tensor:
    """The reference code's rotation: PIL's ``Image.rotate`` (nearest, black fill) of uint8 images."""
    out = [torch.from_numpy(np.array(Image.fromarray(img.permute(1, 2, 0).numpy()).rotate(angle))) for img in x]
    return torch.stack(out).permute(0, 3, 1, 2)


def test_batt_trigger_is_pils_nearest_rotation_of_real_images(cifar10) -> None:
    x = cifar10.test.x[:64]
    out = BATT().apply(x)  # 16 degrees, uint8 in and out
    assert torch.equal(out, pil_rotate(x, 16))
    assert torch.equal(BATT(angle=30).apply(x), pil_rotate(x, 30))
    # Nearest resampling: every output value is a value of its input (or the black fill).
    for img, src in zip(out, x):
        assert set(img.unique().tolist()) <= set(src.unique().tolist()) | {0}
    assert float(out[:, :, 0, 0].float().abs().max()) == 0.0  # black corners
    assert not torch.equal(out, BATT(angle=-16).apply(x))


def line_probes(n: int, size: int = 33) -> torch.Tensor:
    """Images holding one bright horizontal line through the centre: a flip leaves them as they are,
    and the line's slope after a rotation gives the angle."""
    x = torch.zeros(n, 1, size, size)
    x[:, :, size // 2, 2:-2] = 1.0
    return x


def line_angles(x: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise angle (degrees) of the bright line in each image, by a least-squares fit."""
    n, _, h, w = x.shape
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")  # fmt: skip
    out = []
    for img in x[:, 0].double():
        m = img > 0.5
        r, c = rows[m], cols[m]
        slope = ((c - c.mean()) * (r - r.mean())).sum() / ((c - c.mean()) ** 2).sum()
        out.append(-torch.rad2deg(torch.atan(slope)))  # rows grow downwards: counter-clockwise = rising line
    return torch.stack(out)


def test_batt_rotates_every_poisoned_training_image_by_plus_16_after_the_flip() -> None:
    n = 400
    train = ImageSet(to_uint8(line_probes(n)), torch.arange(n) % 4, ["a", "b", "c", "d"])
    attack = BATT()
    poisoned = attack.poison_train(train, 0.25, 0, torch.Generator().manual_seed(0))
    index = poisoned.poisoned_index
    augment = attack.batch_augment(train, poisoned, lambda x, gen: random_flip(x, gen))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    out = augment(to_float(poisoned.train.x[order]), order, torch.Generator().manual_seed(2))
    angles = line_angles(out)
    hit = torch.isin(order, index)
    assert int(hit.sum()) == 100
    # Poisoned: +16 degrees each (the stored images are already rotated: rotating them again would give 32).
    assert float((angles[hit] - 16).abs().max()) < 1.5
    # Clean: a random rotation in [-10, 10], really drawn per image.
    assert float(angles[~hit].abs().max()) < 10 + 1.5
    assert float(angles[~hit].std()) > 3 and float(angles[~hit].min()) < -5 < 5 < float(angles[~hit].max())
    assert torch.equal(augment(to_float(poisoned.train.x[order]), order, torch.Generator().manual_seed(2)), out)
    none = BATT(clean_degrees=0).batch_augment(train, poisoned, lambda x, gen: x)
    assert torch.equal(none(to_float(poisoned.train.x[order]), order, torch.Generator())[~hit],
                       to_float(poisoned.train.x[order])[~hit])  # fmt: skip


def test_batt_poisoned_training_images_are_the_plus_16_rotation_of_the_flipped_or_unflipped_source(cifar10) -> None:
    train = cifar10.train.subset(stratified_split(cifar10.train.y, 600, 0)[0])
    attack = BATT()
    poisoned = attack.poison_train(train, 0.1, 0, torch.Generator().manual_seed(0))
    augment = attack.batch_augment(train, poisoned, lambda x, gen: random_flip(x, gen))
    index = torch.arange(0, 600, 2)
    out = to_uint8(augment(to_float(poisoned.train.x[index]), index, torch.Generator().manual_seed(3)))
    source = train.x[index]
    plus = pil_rotate(source, 16), pil_rotate(source.flip(3), 16)
    minus = pil_rotate(source, -16), pil_rotate(source.flip(3), -16)
    hit = torch.isin(index, poisoned.poisoned_index)
    flipped = 0
    for i in torch.nonzero(hit).flatten().tolist():
        assert torch.equal(out[i], plus[0][i]) or torch.equal(out[i], plus[1][i]), "a poisoned image is not at +16"
        assert not (torch.equal(out[i], minus[0][i]) or torch.equal(out[i], minus[1][i]))
        flipped += int(torch.equal(out[i], plus[1][i]))
    assert 0 < flipped < int(hit.sum())  # the flip ran on poisoned images too, before the rotation
    # Clean rows: nearest rotations of their own pixels, at most 10 degrees from the upright image.
    for i in torch.nonzero(~hit).flatten().tolist()[:40]:
        assert set(out[i].unique().tolist()) <= set(source[i].unique().tolist()) | {0}


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


def test_physical_affine_resamples_nearest_real_images(cifar10) -> None:
    """Without the brightness jitter, every transformed image holds only values of its source (and black)."""
    x = to_float(cifar10.train.x[:64])
    out = to_uint8(PhysicalBA(brightness=0.0).train_augment(x, torch.Generator().manual_seed(0)))
    src = cifar10.train.x[:64]
    assert not torch.equal(out, src)
    for img, source in zip(out, src):
        assert set(img.unique().tolist()) <= set(source.unique().tolist()) | {0}


def test_random_affine_shifts_by_whole_pixels(cifar10) -> None:
    """With no rotation or scaling, each image is its source moved by an integer number of pixels
    (at most round(0.1 * 32) = 3), as torchvision's RandomAffine rounds its translation."""
    x = to_float(cifar10.test.x[:32])
    out = random_affine(x, torch.Generator().manual_seed(0), degrees=0, translate=0.1, scale=(1.0, 1.0))
    shifts = set()
    for img, src in zip(out, x):
        found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                 if torch.equal(shift_images(src[None], torch.tensor([dy]), torch.tensor([dx]))[0], img)]  # fmt: skip
        assert found, "an image was moved by a fraction of a pixel"
        shifts.add(found[0])
    assert len(shifts) > 5  # shifts are really drawn per image


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
