"""The installed package, not the checkout: a wheel holds every module, the shipped grids and the
report template, and its ``run-bench`` finds the default grid from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What a build must not copy: virtual environments, run directories, datasets, build debris.
NOT_SOURCE = (".git", ".venv*", "results", "data", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the checkout (the build writes into its source tree)."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (the dev extra has it)")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(root / "dist"), str(source)], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (root / "dist").glob("backdoor_bench-*.whl")
    return path


def test_the_wheel_holds_every_module_the_grids_and_the_template(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for top in ("bench", "attacks", "defenses") for p in (REPO / top).rglob("*.py")
               if "__pycache__" not in p.parts}  # fmt: skip
    assert modules and modules <= names, sorted(modules - names)
    grids = {f"bench/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert "bench/configs/quick.yaml" in grids and grids <= names
    assert {"run_bench.py", "bench/report/templates/report.html.j2"} <= names
    assert not any(n.startswith(("tests/", "results/", "configs/")) for n in names)


def test_the_installed_command_finds_its_grids_from_another_directory(wheel: Path, tmp_path: Path) -> None:
    """Installed without dependencies into a folder of its own, run with this environment's packages."""
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}

    def run_bench(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(target / "bin" / "run-bench"), *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    where = subprocess.run([sys.executable, "-c", "import bench.cli; print(bench.cli.DEFAULT_CONFIG)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True)  # fmt: skip
    assert Path(where.stdout.strip()) == target / "bench" / "configs" / "quick.yaml", where.stderr
    default = run_bench("run", "--dry-run")
    assert default.returncode == 0, default.stderr[-3000:]
    assert default.stdout.startswith("4 cells in quick")
    named = run_bench("run", "configs/cifar10_cpu.yaml", "--dry-run")
    assert named.returncode == 0 and "cells in cifar10_cpu" in named.stdout, named.stderr[-3000:]
    missing = run_bench("run", "configs/no_such_grid.yaml", "--dry-run")
    assert missing.returncode == 2 and "error: config file configs/no_such_grid.yaml does not exist" in missing.stderr
    assert not (elsewhere / "results").exists()  # a dry run writes nothing
