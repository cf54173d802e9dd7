"""benchmarks/gpu_reference.sh, run on the CPU with a tiny MNIST grid: what its archive holds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_reference.sh"
GRID = {
    "name": "tiny-gpu-ref",
    "datasets": [{"name": "mnist5k", "train_subset": 1000, "test_subset": 300}],
    "models": [{"name": "small_cnn", "width": 4}],
    "attacks": ["badnets", {"name": "blended", "alpha": 0.2}],
    "defenses": ["none", {"name": "shrinkpad", "pad": 2}, {"name": "refine", "width": 4, "epochs": 1}],
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.05, "milestones": [], "flip": False},
    "tsne": {"per_class": 4, "poisoned_per_class": 2},
}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")  # fmt: skip


def _script(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OUT": str(tmp / "out"), "GPU_REF_CONFIG": str(tmp / "grid.yaml"), "GPU_REF_DEVICE": "cpu",
               "GPU_REF_WORK": str(tmp / "work"), "GPU_REF_DATA": str(tmp / "no-data"), "PYTHON": sys.executable,
               **env}  # fmt: skip
    return subprocess.run(["bash", str(SCRIPT), *args], env=environ, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("gpu-ref")
    (tmp / "grid.yaml").write_text(yaml.safe_dump(GRID, sort_keys=False))
    return tmp, _script(tmp, "badnets", "none,refine")


def test_the_archive_holds_the_slices_results_and_no_weights(packed):
    tmp, done = packed
    assert done.returncode == 0, done.stderr
    archives = list((tmp / "out").glob("*.tar.gz"))
    assert len(archives) == 1 and archives[0].stat().st_size < 16 * 1024 * 1024
    assert sorted(p.name for p in (tmp / "out").iterdir()) == sorted([archives[0].name,
                                                                    archives[0].name[:-7] + "-summary.txt"])  # fmt: skip
    assert list((tmp / "work" / "cache").rglob("*.pt"))  # the run did write weights, into the cache
    with tarfile.open(archives[0]) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    assert top.startswith("grid-badnets-none-refine-")  # the grid file, the slice, the time
    inside = {name.split("/", 1)[1] for name in names if "/" in name}
    assert not [n for n in inside if n.endswith((".pt", ".pth", ".npz")) or n.startswith(("cache", "features"))]
    records = [n for n in inside if n.startswith("records/") and n.endswith(".json")]
    assert len(records) == 2  # badnets x (none, refine): the slice, not the grid
    for name in ("cells.csv", "table.md", "table.tex", "report.html", "config.yaml", ".backdoor-bench-run"):
        assert name in inside, name
    assert any(n.startswith("figures/tsne-") and n.endswith(".png") for n in inside)


def test_the_summary_says_what_ran(packed):
    tmp, _ = packed
    summary = next((tmp / "out").glob("*-summary.txt")).read_text()
    assert "exit status: 0" in summary and "cells with records: 2" in summary
    assert "--only attacks=badnets" in summary and "--only defenses=none,refine" in summary
    assert "torch " in summary and "--- nvidia-smi" in summary


def test_an_unpacked_archive_is_a_run_directory_the_table_command_reads(packed, tmp_path):
    tmp, _ = packed
    with tarfile.open(next((tmp / "out").glob("*.tar.gz"))) as tar:
        tar.extractall(tmp_path, filter="data")
    run_dir = next(tmp_path.iterdir())
    done = subprocess.run([sys.executable, str(REPO / "run_bench.py"), "table", str(run_dir), "--out",
                           str(tmp_path / "merged"), "--no-tsne"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "merged" / "table.md").read_text() == (run_dir / "table.md").read_text()


def test_an_archive_over_the_bound_is_refused_loudly(packed):
    tmp, _ = packed
    shutil.rmtree(tmp / "out")
    done = _script(tmp, "blended", "none", GPU_REF_MAX_BYTES="1000")
    assert done.returncode == 3
    assert "ARCHIVE TOO BIG" in done.stderr
    assert not list((tmp / "out").glob("*.tar.gz"))
    assert "ARCHIVE TOO BIG" in next((tmp / "out").glob("*-summary.txt")).read_text()


def test_bad_arguments_are_one_line_and_exit_2(packed):
    tmp, _ = packed
    done = _script(tmp, "badnets", OUT="")
    assert done.returncode == 2 and done.stderr.strip() == "error: set OUT to the folder the archive is written to"
    done = _script(tmp, "badnets", GPU_REF_LIMIT_S="soon")
    assert done.returncode == 2 and done.stderr.strip() == "error: GPU_REF_LIMIT_S must be a positive number of seconds"
