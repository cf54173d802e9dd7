"""Adaptive-Patch: weak patches on poisoned and cover samples, the first two at full strength at test."""

from __future__ import annotations

import pytest
import torch

from attacks.adaptive_patch import AdaptivePatch
from bench.core.data import ImageSet, stratified_split
from bench.core.device import to_float
from bench.core.errors import BenchError


@pytest.fixture(scope="module")
def train(cifar10) -> ImageSet:
    index, _ = stratified_split(cifar10.train.y, 1000, 0)
    return cifar10.train.subset(index)


def test_built_in_patches_have_the_reference_shapes_and_are_seeded() -> None:
    """The reference's four trigger images cover 25, 16, 140 and 64 pixels of a 32-px image."""
    attack = AdaptivePatch()
    marks, masks = attack.patches(3, 32, 32)
    assert marks.shape == (4, 3, 32, 32) and masks.shape == (4, 1, 32, 32)
    assert [int(m.sum()) for m in masks] == [25, 16, 140, 64]
    assert torch.equal(marks * masks, marks), "a patch has colour outside its mask"
    assert bool((marks[1][:, masks[1, 0] > 0] == 1).all()), "the corner marks are white"
    assert torch.equal(AdaptivePatch().patches(3, 32, 32)[0], marks)
    other = AdaptivePatch(pattern_seed=1).patches(3, 32, 32)
    assert torch.equal(other[1], masks) and not torch.equal(other[0], marks)  # same shapes, other colours


def test_patches_from_files_are_masked_where_not_black(tmp_path) -> None:
    from PIL import Image

    paths = []
    for j, box in enumerate([(0, 0, 3, 3), (5, 5, 9, 8)]):
        img = torch.zeros(16, 16, 3, dtype=torch.uint8)
        img[box[0] : box[2], box[1] : box[3]] = torch.tensor([200, 10 * j, 30], dtype=torch.uint8)
        paths.append(str(tmp_path / f"p{j}.png"))
        Image.fromarray(img.numpy()).save(paths[-1])
    attack = AdaptivePatch(patterns=paths, alphas=[0.5, 0.5], test_patches=1)
    marks, masks = attack.patches(3, 16, 16)
    assert [int(m.sum()) for m in masks] == [9, 12]
    out = attack.apply(torch.zeros(1, 3, 16, 16))
    assert int((out.abs().sum(1) > 0).sum()) == 9  # only the first patch at test time


def test_counts_follow_the_attack_rates(train: ImageSet) -> None:
    attack = AdaptivePatch()
    result = attack.poison_train(train, 0.1, 0, torch.Generator().manual_seed(0))
    assert result.poisoned_index.numel() == 10  # its own 1 %, not the grid's 10 %
    assert result.cover_index.numel() == 20
    assert not set(result.poisoned_index.tolist()) & set(result.cover_index.tolist())
    assert bool((result.train.y[result.poisoned_index] == 0).all())
    assert torch.equal(result.train.y[result.cover_index], train.y[result.cover_index])
    grid_rate = AdaptivePatch(poison_rate=None).poison_train(train, 0.1, 0, torch.Generator().manual_seed(0))
    assert grid_rate.poisoned_index.numel() == 100


def test_training_samples_carry_one_weak_patch_each(train: ImageSet) -> None:
    attack = AdaptivePatch()
    result = attack.poison_train(train, 0.1, 0, torch.Generator().manual_seed(0))
    marks, masks = attack.patches(3, 32, 32)
    for group in (result.poisoned_index, result.cover_index):
        before, after = to_float(train.x[group]), to_float(result.train.x[group])
        for i in range(group.numel()):
            j = i % 4
            inside = masks[j, 0] > 0
            expected = before[i] + attack.params.alphas[j] * (marks[j] - before[i])
            torch.testing.assert_close(after[i][:, inside], expected[:, inside], atol=1 / 255 + 1e-6, rtol=0)
            others = (masks.sum(0)[0] - masks[j, 0] > 0) & ~inside
            assert torch.equal(after[i][:, others], before[i][:, others]), "a sample got more than one patch"


def test_test_images_carry_exactly_the_first_two_patches_at_full_strength(train: ImageSet) -> None:
    attack = AdaptivePatch()
    marks, masks = attack.patches(3, 32, 32)
    x = to_float(train.x[:5])
    out = attack.apply(x)
    first, second = masks[0, 0] > 0, masks[1, 0] > 0
    # Patch 0 lies on top of patch 1 where they meet (the reference stamps it last).
    torch.testing.assert_close(out[:, :, first], marks[0][:, first].expand(5, -1, -1))
    only_second = second & ~first
    torch.testing.assert_close(out[:, :, only_second], marks[1][:, only_second].expand(5, -1, -1))
    torch.testing.assert_close(out[:, :, ~(first | second)], x[:, :, ~(first | second)])
    # Patches 2 and 3 are not there: their pixels (outside 0 and 1) are the clean image's.
    rest = ((masks[2, 0] > 0) | (masks[3, 0] > 0)) & ~(first | second)
    assert int(rest.sum()) > 150 and torch.equal(out[:, :, rest], x[:, :, rest])
    assert AdaptivePatch(test_patches=4).apply(x)[:, :, rest].ne(x[:, :, rest]).any()


def test_bad_parameters_are_user_errors() -> None:
    for params in ({"alphas": []}, {"alphas": [0.5, 1.5]}, {"poison_rate": 0}, {"cover_rate": 1.2},
                   {"test_alpha": 0}, {"test_patches": 5}, {"test_patches": 0},
                   {"patterns": ["/nonexistent/trigger.png"], "alphas": [0.5]}):  # fmt: skip
        with pytest.raises(BenchError):
            AdaptivePatch(**params)
