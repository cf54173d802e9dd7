"""Where local worker processes go: how many, and on which device each (pure functions).

The semantics of ``--workers`` and ``--jobs-per-gpu`` live here, apart from any process or CUDA
call, so that they are tested on machines without a GPU.
"""

from __future__ import annotations

from bench.core.errors import BenchError


def check_worker_options(device: str, workers: int | None, jobs_per_gpu: int | None, threads_per_job: int) -> None:
    """The errors :func:`place_workers` can find without knowing the machine (Ray's cluster, say)."""
    for name, value in (("--workers", workers), ("--jobs-per-gpu", jobs_per_gpu), ("threads_per_job", threads_per_job)):
        if value is not None and value < 1:
            raise BenchError(f"{name} must be >= 1, got {value}")
    if workers is not None and jobs_per_gpu is not None:
        raise BenchError("give --workers (worker processes in all) or --jobs-per-gpu (per GPU), not both")
    if jobs_per_gpu is not None and device.split(":")[0] == "cpu":
        raise BenchError("--jobs-per-gpu places jobs on GPUs; on the CPU use --workers (default: usable cores / "
                         "threads_per_job)")  # fmt: skip


def place_workers(
    device: str,
    gpu_count: int,
    cores: int,
    workers: int | None = None,
    jobs_per_gpu: int | None = None,
    threads_per_job: int = 1,
) -> tuple[str, ...]:
    """The device of every local worker process, one entry per worker (a pure function).

    ``device`` is the request (``auto``, ``cpu``, ``cuda``, ``cuda:N``); ``gpu_count`` the GPUs
    visible to this process; ``cores`` the CPU cores it may use.

    - CPU: ``workers`` processes (default: ``cores // threads_per_job``, at least 1), each job
      with ``threads_per_job`` threads: parallelism comes from jobs side by side, so a job's
      numbers never depend on the machine's core count. ``jobs_per_gpu`` is an error with an
      explicit ``cpu`` and ignored when ``auto`` finds no GPU (one command for every machine).
    - CUDA without an index: ``workers`` processes (default: ``gpu_count * jobs_per_gpu``)
      placed round robin, worker ``i`` on GPU ``i % gpu_count``; ``cuda:N``: all on GPU N
      (default ``jobs_per_gpu`` of them). ``workers`` and ``jobs_per_gpu`` are two ways to say
      how many; give one.
    """
    check_worker_options(device, workers, jobs_per_gpu, threads_per_job)
    kind = ("cuda" if gpu_count > 0 else "cpu") if device == "auto" else device.split(":")[0]
    if kind == "cpu":
        return ("cpu",) * (workers or max(1, cores // threads_per_job))
    if kind != "cuda":
        raise BenchError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if gpu_count < 1:
        raise BenchError(f"device {device!r} requested but no GPU is visible")
    if device in ("auto", "cuda"):
        return tuple(f"cuda:{i % gpu_count}" for i in range(workers or gpu_count * (jobs_per_gpu or 1)))
    return (device,) * (workers or jobs_per_gpu or 1)
