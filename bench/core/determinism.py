"""Compute settings that make a job's numbers a function of its config and seed alone.

Two things besides the seed decide the bits a CPU job produces: the number of intra-op threads
(a float reduction split over two threads adds its partial sums in another order than one
thread does) and, on a GPU, which kernels run (cuDNN's autotuner, atomics in scatter-style
kernels). So every job runs with the grid's ``threads_per_job`` threads whatever the machine
has, and ``deterministic`` asks torch for deterministic kernels. Parallelism comes from running
jobs side by side instead (:mod:`bench.orchestration.execute`).

The settings are process-wide, so :func:`compute_settings` applies them for one job and restores
the previous ones: a job run inside the caller's process leaves it as it found it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

# What ``deterministic`` accepts: off, on (an op without a deterministic kernel raises), or
# deterministic kernels where torch has them and a warning for each op that has none.
Deterministic = bool | Literal["warn"]

# The cuBLAS workspace setting torch's reproducibility notes require for deterministic matmuls
# on CUDA >= 10.2; cuBLAS reads it once per process, when its first handle is created.
CUBLAS_WORKSPACE = ":4096:8"

# Thread pools of the libraries under torch and numpy that size themselves from the environment
# when they start, before any call could set them.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask (``taskset``, cgroups' cpusets) where
    the platform has one, else every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def worker_environment(threads: int, deterministic: Deterministic) -> dict[str, str]:
    """Environment for a fresh worker process: thread pools sized before they start, and the
    cuBLAS workspace setting before CUDA initialises (a value the user set is kept)."""
    env = {name: str(threads) for name in THREAD_VARIABLES}
    if deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    return env


def start_worker_process(threads: int) -> None:
    """Once, first thing in a process that runs only jobs: inter-op threads as many as intra-op.

    The inter-op pool can be sized only before its first use, so this is not part of
    :func:`compute_settings` (jobs run in the driver keep the driver's pool; eager kernels do
    not use it, so it never changes a number).
    """
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already used or set in this process
        pass


@contextmanager
def compute_settings(threads: int, deterministic: Deterministic = False) -> Iterator[None]:
    """Run the body with ``threads`` intra-op threads and the deterministic mode asked for, then
    restore the process's previous settings."""
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    torch.set_num_threads(threads)
    if deterministic:
        # Set before the first cuBLAS call of this process (a worker has it from its environment).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True, warn_only=deterministic == "warn")
        torch.backends.cudnn.benchmark = False  # the autotuner may pick another kernel next time
        torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        threads_before, enabled, warn_only, benchmark, cudnn_deterministic = saved
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cudnn.deterministic = cudnn_deterministic
