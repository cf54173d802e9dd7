"""BadNets and Blended triggers, all-to-one poisoning and the ASR test set."""

from __future__ import annotations

import pytest
import torch

from attacks.badnets import BadNets
from attacks.blended import Blended
from bench.core.data import ImageSet, stratified_split
from bench.core.errors import BenchError


def _changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(H, W) mask of pixels changed in any image or channel."""
    return (before != after).any(0).any(0)


@pytest.mark.parametrize("position,box", [("bottom_right", (29, 29)), ("top_left", (0, 0)), ([5, 7], (5, 7))])
def test_badnets_patch_lands_where_configured_and_nowhere_else(cifar10, position, box):
    x = cifar10.test.x[:64]
    attack = BadNets(size=3, position=position)
    out = attack.apply(x)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[box[0] : box[0] + 3, box[1] : box[1] + 3] = True
    assert torch.equal(_changed(x, out) | expected, expected)  # nothing outside the patch changed
    patch = out[:, :, box[0] : box[0] + 3, box[1] : box[1] + 3]
    assert bool((patch == 255).all())
    assert torch.equal(out[:, :, ~expected], x[:, :, ~expected])


def test_badnets_random_pattern_is_fixed_grayscale_and_seeded(mnist):
    a = BadNets(pattern="random", pattern_seed=1).apply(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    b = BadNets(pattern="random", pattern_seed=1).apply(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    c = BadNets(pattern="random", pattern_seed=2).apply(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    patch = a[0, :, 29:, 29:]
    assert torch.equal(patch[0], patch[1]) and torch.equal(patch[1], patch[2])  # gray: same in all channels
    assert len(torch.unique(patch)) > 1
    assert torch.equal(a[0], a[1])  # the same pattern on every image


GRAY = [[247, 241, 130], [106, 201, 92], [153, 163, 20]]  # the REFINE code's CIFAR-10 pattern


def test_badnets_explicit_gray_pattern_lands_pixel_exact(cifar10):
    """Poisoned training images carry exactly the given uint8 values, on every channel, bottom-right."""
    train = cifar10.train.subset(stratified_split(cifar10.train.y, 300, 0)[0])
    attack = BadNets(pattern=GRAY)
    result = attack.poison_train(train, 0.1, 0, torch.Generator().manual_seed(0))
    index = result.poisoned_index
    assert index.numel() == 30
    patch = result.train.x[index][:, :, 29:, 29:]
    assert torch.equal(patch, torch.tensor(GRAY, dtype=torch.uint8).expand(30, 3, 3, 3))
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[29:, 29:] = False
    assert torch.equal(result.train.x[index][:, :, outside], train.x[index][:, :, outside])
    # The test-time trigger is the same stamp, on float images too.
    assert torch.equal(attack.apply(cifar10.test.x[:4])[:, :, 29:, 29:],
                       torch.tensor(GRAY, dtype=torch.uint8).expand(4, 3, 3, 3))  # fmt: skip
    float_patch = attack.apply(cifar10.test.x[:4].float() / 255)[:, :, 29:, 29:]
    assert torch.equal((float_patch * 255).round().to(torch.uint8), patch[:4])


def test_badnets_per_channel_pattern_and_its_checks(cifar10):
    squares = [[[255, 0], [0, 255]], [[0, 255], [255, 0]], [[10, 20], [30, 40]]]
    out = BadNets(pattern=squares, position="top_left").apply(cifar10.test.x[:2])
    assert torch.equal(out[0, :, :2, :2], torch.tensor(squares, dtype=torch.uint8))
    assert BadNets(pattern=squares).patch_size(32) == 2  # the side comes from the pattern
    with pytest.raises(BenchError, match="2 channel squares but the images have 1 channels"):
        BadNets(pattern=squares[:2]).apply(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_badnets_patch_size_defaults_to_20_on_imagenet_sized_images():
    out = BadNets().apply(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert int(_changed(torch.zeros(1, 3, 224, 224, dtype=torch.uint8), out).sum()) == 400


def test_blended_is_the_alpha_mix_with_a_fixed_image(cifar10):
    x = cifar10.test.x[:8]
    attack = Blended(alpha=0.1)
    out = attack.apply(x.float() / 255)
    pattern = attack.blend_image(3, 32, 32)
    assert torch.allclose(out, 0.9 * x.float() / 255 + 0.1 * pattern, atol=1e-6)
    assert torch.equal(Blended(alpha=0.1).apply(x), attack.apply(x))
    assert (attack.apply(x).int() - x.int()).abs().max() <= 26  # 0.1 * 255, rounded


def test_poisoned_count_is_round_rate_n_and_no_target_sample_is_poisoned(mnist):
    train = mnist.train
    for rate in (0.1, 0.05, 0.013):
        poisoned = BadNets().poison_train(train, rate, 0, torch.Generator().manual_seed(0))
        idx = poisoned.poisoned_index
        assert idx.numel() == round(rate * len(train))
        assert bool((train.y[idx] != 0).all())  # drawn from non-target classes only
        assert bool((poisoned.train.y[idx] == 0).all())
        others = torch.ones(len(train), dtype=torch.bool)
        others[idx] = False
        assert torch.equal(poisoned.train.x[others], train.x[others])
        assert torch.equal(poisoned.train.y[others], train.y[others])
        assert not torch.equal(poisoned.train.x[idx], train.x[idx])


def test_poison_selection_is_seeded(mnist):
    a = BadNets().poison_train(mnist.train, 0.1, 3, torch.Generator().manual_seed(1)).poisoned_index
    b = BadNets().poison_train(mnist.train, 0.1, 3, torch.Generator().manual_seed(1)).poisoned_index
    c = BadNets().poison_train(mnist.train, 0.1, 3, torch.Generator().manual_seed(2)).poisoned_index
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_asr_set_has_no_target_class_sample(mnist):
    x, y = Blended().poison_test(mnist.test, target=4)
    assert x.shape[0] == int((mnist.test.y != 4).sum()) and bool((y != 4).all())


def test_pool_all_draws_from_the_target_class_too_and_keeps_its_label(mnist):
    """``pool: all`` (the references' convention): round(rate * N) samples from every class; a drawn
    target-class sample gets the trigger and keeps the target label."""
    train, target = mnist.train, 3
    attack = BadNets()
    result = attack.poison_train(train, 0.3, target, torch.Generator().manual_seed(0), pool="all")
    index = result.poisoned_index
    assert index.numel() == round(0.3 * len(train))
    drawn = train.y[index]
    assert int((drawn == target).sum()) > 0, "no target-class sample was drawn"
    assert set(drawn.tolist()) == set(range(10))
    assert bool((result.train.y[index] == target).all())
    assert torch.equal(result.train.x[index], attack.apply(train.x[index]))
    default = attack.poison_train(train, 0.3, target, torch.Generator().manual_seed(0)).poisoned_index
    assert not bool((train.y[default] == target).any())


def test_impossible_rate_for_the_non_target_pool_is_an_error():
    tiny = ImageSet(torch.zeros(10, 1, 8, 8, dtype=torch.uint8), torch.tensor([0] * 8 + [1, 2]), ["a", "b", "c"])
    with pytest.raises(BenchError, match="outside the target class"):
        BadNets().poison_train(tiny, 0.5, 0, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kwargs,match", [
    ({"size": 0}, "size must be >= 1"),
    ({"pattern": "checker"}, "pattern must be"),
    ({"colour": "red"}, "unknown parameter 'colour'"),
])  # fmt: skip
def test_bad_badnets_parameters(kwargs, match):
    with pytest.raises(BenchError, match=match):
        BadNets(**kwargs)


def test_patch_that_does_not_fit_is_an_error():
    with pytest.raises(BenchError, match="does not fit"):
        BadNets(size=3, position=[30, 30]).apply(torch.zeros(1, 1, 32, 32))
