"""Adaptive-Patch: weak patches on poisoned and cover samples, all patches at full strength at test."""

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


def test_patches_are_distinct_non_overlapping_and_seeded() -> None:
    attack = AdaptivePatch()
    marks, masks = attack.patches(3, 32, 32)
    assert marks.shape == (4, 3, 32, 32) and masks.shape == (4, 1, 32, 32)
    assert torch.equal(masks.sum(0).clamp(max=1), masks.sum(0)), "patches overlap"
    assert [int(m.sum()) for m in masks] == [16] * 4  # 4x4 on 32-px images
    assert torch.equal(AdaptivePatch().patches(3, 32, 32)[0], marks)
    assert not torch.equal(AdaptivePatch(pattern_seed=1).patches(3, 32, 32)[1], masks)


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
            others = masks.sum(0)[0] - masks[j, 0] > 0
            assert torch.equal(after[i][:, others], before[i][:, others]), "a sample got more than one patch"


def test_test_trigger_stamps_every_patch_at_full_strength(train: ImageSet) -> None:
    attack = AdaptivePatch()
    marks, masks = attack.patches(3, 32, 32)
    out = attack.apply(to_float(train.x[:5]))
    region = masks.sum(0)[0] > 0
    torch.testing.assert_close(out[:, :, region], marks.sum(0)[:, region].expand(5, -1, -1))
    torch.testing.assert_close(out[:, :, ~region], to_float(train.x[:5])[:, :, ~region])


def test_bad_parameters_are_user_errors() -> None:
    for params in ({"alphas": []}, {"alphas": [0.5, 1.5]}, {"poison_rate": 0}, {"cover_rate": 1.2},
                   {"test_alpha": 0}, {"size": 0}):  # fmt: skip
        with pytest.raises(BenchError):
            AdaptivePatch(**params)
    with pytest.raises(BenchError, match="do not fit"):
        AdaptivePatch(size=20).apply(torch.zeros(1, 3, 32, 32))
