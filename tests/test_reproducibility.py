"""Same config + seed = same numbers, whatever the machine's core count; where workers go.

The proof runs a real grid (MNIST, a small CNN, BadNets against no defense, ShrinkPad and a
tiny REFINE) through the command line twice, each from an empty cache: once on one core with
``OMP_NUM_THREADS=1``, once on two cores with ``OMP_NUM_THREADS=2`` (two worker processes by
default there). The tables and the trained artifacts must agree byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from gridrun import cli_command, cli_env, write_grid

from bench.core.data import DataPaths
from bench.core.determinism import CUBLAS_WORKSPACE, compute_settings, worker_environment
from bench.core.errors import BenchError
from bench.orchestration.config import validate
from bench.orchestration.execute import run_grid
from bench.orchestration.placement import place_workers

REPO = Path(__file__).resolve().parent.parent

# Two epochs and one REFINE epoch are enough for the float reductions of a 1- and a 2-thread run
# to part: without fixed threads per job the model and the U-Net differ in their first bytes.
GRID = {
    "datasets": [{"name": "mnist5k", "train_subset": 3000, "test_subset": 600}],
    "models": [{"name": "small_cnn", "width": 8}],
    "attacks": ["badnets"],
    "defenses": [
        "none",
        {"name": "shrinkpad", "pad": 2},
        {"name": "refine", "width": 4, "epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.001,
         "milestones": [], "benign_fraction": 0.1},
    ],
    "seeds": [0],
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "milestones": [], "crop_padding": 2, "flip": False},
}  # fmt: skip


# ----------------------------------------------------------------------------- placement


@pytest.mark.parametrize(
    "device, gpus, cores, workers, per_gpu, threads, expected",
    [
        ("cpu", 0, 8, None, None, 1, ("cpu",) * 8),  # one job per usable core
        ("cpu", 0, 8, None, None, 3, ("cpu",) * 2),  # cores // threads_per_job
        ("cpu", 0, 2, None, None, 4, ("cpu",)),  # at least one
        ("cpu", 2, 8, 3, None, 1, ("cpu",) * 3),  # --device cpu on a GPU machine: GPUs unused
        ("auto", 0, 4, None, 5, 1, ("cpu",) * 4),  # auto without a GPU: --jobs-per-gpu ignored
        ("auto", 2, 16, None, None, 1, ("cuda:0", "cuda:1")),  # one per GPU
        ("cuda", 2, 16, None, 3, 1, ("cuda:0", "cuda:1") * 3),  # K per GPU, round robin
        ("cuda", 3, 16, 4, None, 2, ("cuda:0", "cuda:1", "cuda:2", "cuda:0")),  # --workers: round robin
        ("cuda:1", 2, 16, None, None, 1, ("cuda:1",)),
        ("cuda:1", 2, 16, None, 2, 1, ("cuda:1",) * 2),
    ],
)  # fmt: skip
def test_place_workers(device, gpus, cores, workers, per_gpu, threads, expected):
    assert place_workers(device, gpus, cores, workers, per_gpu, threads) == expected


@pytest.mark.parametrize(
    "device, gpus, workers, per_gpu, message",
    [
        ("cpu", 0, None, 2, "--jobs-per-gpu places jobs on GPUs"),
        ("cuda", 2, 4, 2, "not both"),
        ("cuda", 2, 0, None, "--workers must be >= 1"),
        ("cuda", 2, None, 0, "--jobs-per-gpu must be >= 1"),
        ("cuda", 0, None, None, "no GPU is visible"),
        ("tpu", 0, None, None, "unknown device 'tpu'"),
    ],
)
def test_place_workers_rejects(device, gpus, workers, per_gpu, message):
    with pytest.raises(BenchError, match=message):
        place_workers(device, gpus, 8, workers, per_gpu)


# ----------------------------------------------------------------------------- compute settings


def test_compute_settings_apply_for_the_job_and_restore_the_process():
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    other = 2 if before[0] == 1 else 1
    with compute_settings(other, deterministic="warn"):
        assert torch.get_num_threads() == other
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
    after = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    assert after == before
    with pytest.raises(RuntimeError), compute_settings(other, deterministic=True):
        raise RuntimeError("a failing job")
    assert torch.get_num_threads() == before[0] and not torch.are_deterministic_algorithms_enabled()


def test_worker_environment_sizes_thread_pools_and_cublas():
    env = worker_environment(3, deterministic=False)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "3"
    assert "CUBLAS_WORKSPACE_CONFIG" not in env
    saved = os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    try:
        assert worker_environment(1, deterministic=True)["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"  # the user's own choice is kept
        assert worker_environment(1, deterministic="warn")["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        if saved is not None:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved


def test_an_inline_job_runs_with_threads_per_job_and_records_it(tmp_path):
    grid = {**GRID, "datasets": [{"name": "mnist5k", "train_subset": 500, "test_subset": 200}], "defenses": ["none"],
            "train": {**GRID["train"], "epochs": 1}, "threads_per_job": 2}  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_grid(validate(grid, "test"), tmp_path / "run", DataPaths(tmp_path, tmp_path / "cache"), "cpu", workers=1)
        assert torch.get_num_threads() == 1  # the driver's own setting is back
    finally:
        torch.set_num_threads(threads)
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "run" / "records").glob("*.json")]
    assert record["threads_per_job"] == 2 and record["config"]["threads_per_job"] == 2
    assert record["versions"]["torch"] == torch.__version__ and record["cpu_capability"]


# ----------------------------------------------------------------------------- the proof


def _run_on_cores(tmp_path: Path, name: str, cores: set[int], *extra: str) -> Path:
    """Run the grid from an empty cache with ``len(cores)`` OpenMP threads, pinned to ``cores``."""
    config = write_grid(tmp_path / "grid.yaml", GRID)
    root = tmp_path / name
    env = {**cli_env(), "OMP_NUM_THREADS": str(len(cores)), "MKL_NUM_THREADS": str(len(cores))}
    done = subprocess.run(cli_command(config, root / "run", root / "cache", *extra), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def _artifacts(cache: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for kind in ("models", "defenses")
            for p in sorted((cache / kind).glob("*.pt"))}  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "records").glob("*.json"))]


@pytest.fixture(scope="module")
def one_core_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs CPU affinity and at least two usable cores")
    return _run_on_cores(tmp_path_factory.mktemp("repro"), "one-core", {0})


@pytest.mark.slow
def test_one_core_and_two_cores_give_identical_tables_and_artifacts(one_core_run, tmp_path):
    cores = sorted(os.sched_getaffinity(0))[:2]
    two = _run_on_cores(tmp_path, "two-cores", set(cores))
    one = one_core_run
    assert json.loads((one / "run" / "run.json").read_text())["workers"] == 1
    assert json.loads((two / "run" / "run.json").read_text())["workers"] == 2  # jobs side by side
    assert (two / "run" / "cells.csv").read_bytes() == (one / "run" / "cells.csv").read_bytes()
    ours, theirs = _artifacts(two / "cache"), _artifacts(one / "cache")
    assert len(ours) == 2 and sorted(ours) == sorted(theirs)  # the model and the REFINE state
    assert all(ours[key] == theirs[key] for key in ours), "an artifact differs between the runs"
    assert {r["threads_per_job"] for r in _records(one / "run") + _records(two / "run")} == {1}


@pytest.mark.slow
def test_deterministic_mode_changes_no_number_on_the_cpu(one_core_run, tmp_path):
    """``deterministic: true`` on the CPU: the same numbers and artifact bytes as without it (under
    other keys: the setting changes CUDA numbers, so it is part of every key), and the process left
    as it was."""
    config = validate({**GRID, "deterministic": True}, "test")
    run_grid(config, tmp_path / "run", DataPaths(tmp_path, tmp_path / "cache"), "cpu", workers=1)
    assert not torch.are_deterministic_algorithms_enabled()
    ours, theirs = (pd.read_csv(run / "cells.csv") for run in (tmp_path / "run", one_core_run / "run"))
    assert not set(ours["cell_id"]) & set(theirs["cell_id"])
    pd.testing.assert_frame_equal(ours.drop(columns="cell_id"), theirs.drop(columns="cell_id"))
    assert sorted(_artifacts(tmp_path / "cache").values()) == sorted(_artifacts(one_core_run / "cache").values())
