"""Label-Consistent: a share of the target class, labels kept, PGD within eps, a flip-proof corner trigger."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attacks.base import FitContext
from attacks.label_consistent import LabelConsistent, pgd_away_from_label
from bench.core.data import ImageSet, stratified_split
from bench.core.device import to_float
from bench.core.errors import BenchError
from bench.core.models import build_model


def tiny_model(train: ImageSet) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", train.num_classes, train.x.shape[1], width=4).eval()


@pytest.fixture(scope="module")
def train(cifar10) -> ImageSet:
    index, _ = stratified_split(cifar10.train.y, 200, 0)
    return cifar10.train.subset(index)


def test_corner_trigger_survives_a_horizontal_flip(cifar10) -> None:
    attack = LabelConsistent()
    x = to_float(cifar10.test.x[:8])
    torch.testing.assert_close(attack.trigger(x.flip(3)), attack.trigger(x).flip(3))
    pattern, mask = attack.corner_masks(32, 32)
    assert int(mask.sum()) == 4 * 9
    assert float(pattern[0, 0]) == 1.0 and float(pattern[0, 1]) == 0.0  # checkerboard, white outer corner
    half = LabelConsistent(amplitude=0.5).trigger(x)
    torch.testing.assert_close(half[:, :, 0, 0], 0.5 * x[:, :, 0, 0] + 0.5)


def test_pgd_stays_within_eps_and_raises_the_loss(train: ImageSet) -> None:
    model = tiny_model(train)
    x, y = to_float(train.x[:16]), train.y[:16]
    eps = 8 / 255
    adv = pgd_away_from_label(model, x, y, eps, 1.5 / 255, 10, torch.Generator().manual_seed(0))
    assert float((adv - x).abs().max()) <= eps + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_poisons_only_target_class_images_and_keeps_labels(train: ImageSet) -> None:
    attack = LabelConsistent(steps=5)
    calls = []

    def clean_model():
        calls.append(1)
        return tiny_model(train)

    attack.fit(train, torch.Generator().manual_seed(0), FitContext(torch.device("cpu"), clean_model))
    result = attack.poison_train(train, 0.5, 0, torch.Generator().manual_seed(0))
    index = result.poisoned_index
    assert calls == [1], "the clean model is requested once, and only when poisoning"
    assert index.numel() == 10 and bool((train.y[index] == 0).all())  # half of the 20 target-class images
    assert torch.equal(result.train.y, train.y)
    changed = (result.train.x != train.x).flatten(1).any(1)
    assert set(torch.nonzero(changed).flatten().tolist()) == set(index.tolist())
    # Away from the trigger's corners, the change is the PGD perturbation: at most eps (+ rounding).
    _, mask = attack.corner_masks(32, 32)
    delta = (result.train.x[index].int() - train.x[index].int()).abs()
    assert int(delta[:, :, mask == 0].max()) <= round(255 * 8 / 255) + 1
    assert int(delta[:, :, mask == 0].max()) >= 1
    # The corners carry the trigger exactly.
    assert torch.equal(result.train.x[index][:, :, mask > 0], attack.apply(train.x[index])[:, :, mask > 0])


def test_needs_a_clean_model(train: ImageSet) -> None:
    attack = LabelConsistent(steps=1)
    attack.fit(train, torch.Generator().manual_seed(0))
    with pytest.raises(BenchError, match="clean model"):
        attack.poison_train(train, 0.25, 0, torch.Generator().manual_seed(0))


def test_rate_is_a_share_of_the_target_class(cifar10) -> None:
    """REFINE's 25%: a quarter of the target class, whatever the set's size or the pool setting."""
    train = cifar10.train.subset(stratified_split(cifar10.train.y, 1000, 0)[0])  # 100 per class
    attack = LabelConsistent(steps=0, poison_rate=0.25)
    attack.fit(train, torch.Generator().manual_seed(0), FitContext(torch.device("cpu"), lambda: tiny_model(train)))
    for target in (0, 7):
        for pool in ("non_target", "all"):
            result = attack.poison_train(train, 0.1, target, torch.Generator().manual_seed(0), pool=pool)
            assert result.poisoned_index.numel() == 25 and bool((train.y[result.poisoned_index] == target).all())
    grid_rate = LabelConsistent(steps=0)
    grid_rate.fit(train, torch.Generator().manual_seed(0), FitContext(torch.device("cpu"), lambda: tiny_model(train)))
    assert grid_rate.poison_train(train, 0.1, 0, torch.Generator().manual_seed(0)).poisoned_index.numel() == 10


def test_pgd_starts_from_the_clean_image_unless_asked(train: ImageSet) -> None:
    model = tiny_model(train)
    x, y = to_float(train.x[:8]), train.y[:8]
    eps = 8 / 255
    # Zero steps show the starting point: the clean image, or a random point of the eps-ball.
    start = pgd_away_from_label(model, x, y, eps, 1.5 / 255, 0, torch.Generator().manual_seed(0))
    assert torch.equal(start, x)
    noisy = pgd_away_from_label(model, x, y, eps, 1.5 / 255, 0, torch.Generator().manual_seed(0), random_start=True)
    assert not torch.equal(noisy, x) and float((noisy - x).abs().max()) <= eps + 1e-6
    # Without a random start PGD is deterministic: the generator does not matter.
    a = pgd_away_from_label(model, x, y, eps, 1.5 / 255, 3, torch.Generator().manual_seed(0))
    b = pgd_away_from_label(model, x, y, eps, 1.5 / 255, 3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not LabelConsistent().params.random_start


def test_patch_trigger_is_the_badnets_stamp(cifar10) -> None:
    """``trigger: patch`` (the REFINE code's choice) stamps the BadNets square, here the gray pattern."""
    gray = [[247, 241, 130], [106, 201, 92], [153, 163, 20]]
    x = cifar10.test.x[:4]
    out = LabelConsistent(trigger="patch", pattern=gray).apply(x)
    assert torch.equal(out[:, :, 29:, 29:], torch.tensor(gray, dtype=torch.uint8).expand(4, 3, 3, 3))
    out[:, :, 29:, 29:] = x[:, :, 29:, 29:]
    assert torch.equal(out, x)


def test_own_poison_rate_replaces_the_grids(train: ImageSet) -> None:
    attack = LabelConsistent(steps=1, poison_rate=0.25)
    attack.fit(train, torch.Generator().manual_seed(0), FitContext(torch.device("cpu"), lambda: tiny_model(train)))
    result = attack.poison_train(train, 0.1, 0, torch.Generator().manual_seed(0))
    assert result.poisoned_index.numel() == 5 and bool((train.y[result.poisoned_index] == 0).all())
    with pytest.raises(BenchError, match="poison_rate"):
        LabelConsistent(poison_rate=1.0)
