"""The Ray executor: each plan job is a Ray task; artifacts meet in the shared cache directory.

``--backend ray`` without ``--address`` starts a private local Ray instance (``--workers`` x
``threads_per_job`` CPUs when given); with ``--address`` it joins a running cluster (``auto``,
``HOST:PORT``). The driver keeps the plan and the scheduling, so a job is submitted only when its
inputs exist and a slot is free; each task asks for ``threads_per_job`` CPUs and, when the
cluster has GPUs, a ``1 / jobs_per_gpu`` share of one. Tasks reuse Ray's worker processes, and
with them the process-wide runner of :mod:`bench.orchestration.executors`.

What a cluster needs: this package importable on every node (same version), and the cache
directory (``--cache-dir``) and data root on a file system every node mounts at the same path;
records and logs are written by the driver only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from bench.core.determinism import start_worker_process, worker_environment
from bench.core.errors import BenchError
from bench.orchestration.executors import JobResult, WorkerSpec, error_line, failure, run_job
from bench.orchestration.placement import place_workers
from bench.orchestration.plan import Job


def _ray_job(spec: WorkerSpec, job: Job) -> JobResult:
    """Body of the Ray task: use the assigned GPU, if any, then run the job with the grid's threads."""
    import ray

    start_worker_process(spec.config.threads_per_job)  # Ray reuses workers: the first task sizes the pools
    device = "cuda:0" if ray.get_gpu_ids() else "cpu"  # Ray narrows CUDA_VISIBLE_DEVICES to the task's GPU
    return run_job(replace(spec, device=device), job)


class RayExecutor:
    """Run jobs as Ray tasks, at most ``slots`` at a time.

    Each task asks for ``threads_per_job`` CPUs and, on a cluster with GPUs, ``1 / jobs_per_gpu``
    of a GPU, so Ray packs ``jobs_per_gpu`` tasks on each GPU; ``slots`` follows
    :func:`bench.orchestration.placement.place_workers` with the cluster's GPU and CPU counts.
    """

    def __init__(self, spec: WorkerSpec, address: str | None = None, workers: int | None = None,
                 jobs_per_gpu: int | None = None) -> None:  # fmt: skip
        try:
            import ray
        except ImportError:
            raise BenchError(
                "--backend ray needs Ray: pip install 'backdoor-bench[ray]' (or pip install ray)"
            ) from None
        self._ray = ray
        threads = spec.config.threads_per_job
        if address is None:
            ray.init(num_cpus=workers * threads if workers else None, include_dashboard=False, log_to_driver=False)
        else:
            try:
                ray.init(address=address, log_to_driver=False)
            except ConnectionError as err:
                raise BenchError(f"cannot reach the Ray cluster at {address!r}: {err}") from None
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if spec.device.startswith("cuda") and not gpus:
            ray.shutdown()
            raise BenchError(f"device {spec.device!r} requested but the Ray cluster has no GPU")
        if spec.device == "cpu":
            gpus = 0
        device = "cpu" if spec.device == "cpu" else "cuda" if gpus else "auto"
        try:
            self.slots = len(place_workers(device, gpus, int(resources.get("CPU", 1)), workers, jobs_per_gpu, threads))
        except BenchError:
            ray.shutdown()
            raise
        options: dict[str, Any] = {"num_cpus": threads}
        if gpus:
            options["num_gpus"] = 1 / (jobs_per_gpu or 1)
        env = worker_environment(threads, spec.config.deterministic)
        self._task = ray.remote(max_retries=0, runtime_env={"env_vars": env}, **options)(_ray_job)
        self._spec = ray.put(spec)
        self._running: dict[Any, tuple[int, Job]] = {}
        share = f"1/{jobs_per_gpu} GPU" if gpus and jobs_per_gpu and jobs_per_gpu > 1 else "1 GPU" if gpus else None
        self._desc = f"ray task ({', '.join(filter(None, [share, f'{threads} CPU']))})"

    def where(self, slot: int) -> str:
        return f"{self._desc}, slot {slot}"

    def start(self, slot: int, job: Job) -> None:
        self._running[self._task.remote(self._spec, job)] = (slot, job)

    def wait(self) -> list[tuple[int, JobResult]]:
        done, _ = self._ray.wait(list(self._running), num_returns=1)
        out = []
        for ref in done:
            slot, job = self._running.pop(ref)
            try:
                out.append((slot, self._ray.get(ref)))
            except Exception as err:  # the worker process died, the node was lost, ...
                out.append((slot, failure(job.job_id, error_line(err), str(err))))
        return out

    def close(self) -> None:
        for ref in self._running:
            self._ray.cancel(ref, force=True)
        self._running.clear()
        self._ray.shutdown()
