"""The job plan (one job per distinct artifact), the scheduler's failure handling, artifact locks."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from gridrun import one_thread
from pydantic import Field

import bench.orchestration.runner
from bench.core.data import DataPaths
from bench.core.params import PluginParams
from bench.core.records import RecordStore
from bench.core.registry import DEFENSES
from bench.orchestration.config import GridConfig
from bench.orchestration.execute import run_grid
from bench.orchestration.executors import JobResult
from bench.orchestration.grid import compile_grid
from bench.orchestration.plan import Job, build_plan
from bench.orchestration.runner import CellRunner
from bench.orchestration.scheduler import execute_plan
from bench.orchestration.status import JobBook, run_status
from bench.orchestration.store import ArtifactStore
from defenses.base import Defense


class SharedFitDefense(Defense):
    """Test-only: trainable, and its intensity knob does not change the fitted state."""

    name = "shared_fit"
    trainable = True
    intensity_param = "k"
    intensity_affects_fit = False

    class Params(PluginParams):
        k: int = Field(1, description="the knob")


@pytest.fixture
def shared_fit(monkeypatch):
    DEFENSES.names()
    monkeypatch.setitem(DEFENSES._items, "shared_fit", SharedFitDefense)


def _config(**changes: Any) -> GridConfig:
    raw = {
        "datasets": ["mnist5k"],
        "models": [{"name": "small_cnn", "width": 8}],
        "attacks": ["badnets", {"name": "blended", "alpha": 0.1}],
        "defenses": ["none", {"name": "shrinkpad", "pad": [2, 4]}, {"name": "shared_fit", "k": [1, 2, 3]}],
        "seeds": [0, 1],
        "train": {"epochs": 1, "batch_size": 128, "milestones": [], "flip": False},
    }
    return GridConfig.model_validate({**raw, **changes})


def test_plan_has_one_job_per_distinct_artifact(tmp_path, shared_fit):
    config = _config()
    cells = compile_grid(config)
    plan = build_plan(cells, RecordStore(tmp_path / "run"), ArtifactStore(tmp_path / "cache"))
    kinds = [job.kind for job in plan]
    assert len(cells) == 2 * 2 * 6
    assert kinds.count("model") == 4  # attacks x seeds
    assert kinds.count("defense") == 4  # shared_fit's three intensities share one fitted state
    assert kinds.count("cell") == len(cells)
    seen: set[str] = set()
    for job in plan:  # topological order: every dependency comes first
        assert set(job.deps) <= seen
        seen.add(job.job_id)
    for cell in cells:
        chain = plan.cell_jobs(cell)
        assert chain[0] == f"model-{cell.model_key}" and chain[-1] == f"cell-{cell.cell_id}"
        assert (f"defense-{cell.defense_key}" in chain) == (cell.defense.name == "shared_fit")
    first = cells[0]
    doomed = plan.dependents(f"model-{first.model_key}")
    assert len(doomed) == 1 + 6  # its defense job and the six cells of that model
    assert all(plan.jobs[j].cell.model_key == first.model_key for j in doomed)


@pytest.mark.parametrize("clean_row_first", [True, False])
def test_clean_label_attacks_wait_for_one_shared_clean_model(tmp_path, clean_row_first):
    attacks = [{"name": "label_consistent", "eps": 0.01}, {"name": "label_consistent", "eps": 0.03}]
    attacks = ["clean", *attacks] if clean_row_first else [*attacks, "clean"]
    config = _config(attacks=attacks, defenses=["none"], seeds=[0])
    cells = compile_grid(config)
    plan = build_plan(cells, RecordStore(tmp_path / "run"), ArtifactStore(tmp_path / "cache"))
    clean_key = cells[0].clean_model_key
    assert all(cell.clean_model_key == clean_key for cell in cells)
    models = [job for job in plan if job.job_id.startswith("model-")]
    assert len(models) == 3  # the clean model once, one model per label-consistent setting
    clean = plan.jobs[f"model-{clean_key}"]
    assert clean.kind == ("model" if clean_row_first else "clean") and clean.deps == ()
    for job in models:
        if job is not clean:
            assert job.cell.attack.name == "label_consistent" and job.deps == (clean.job_id,)
    ids = list(plan.jobs)
    assert all(ids.index(clean.job_id) < ids.index(job.job_id) for job in models if job is not clean)
    # Once the clean model is cached, nothing waits for it.
    ArtifactStore(tmp_path / "cache").save("models", clean_key, {"w": torch.zeros(1)})
    plan = build_plan(cells, RecordStore(tmp_path / "run"), ArtifactStore(tmp_path / "cache"))
    assert f"model-{clean_key}" not in plan.jobs and all(job.deps == () for job in plan if job.kind == "model")


def test_plan_skips_finished_records_and_cached_artifacts(tmp_path, shared_fit):
    config = _config()
    cells = compile_grid(config)
    artifacts, records = ArtifactStore(tmp_path / "cache"), RecordStore(tmp_path / "run")
    cached = cells[0]
    artifacts.save("models", cached.model_key, {"w": torch.zeros(1)})
    done = cells[1]
    records.write({"cell_id": done.cell_id, "dataset": done.dataset.name, "model": done.model.name,
                   "attack_label": done.attack_label, "defense_label": done.defense_label, "seed": done.seed,
                   "ba": 90.0, "asr": 5.0})  # fmt: skip
    plan = build_plan(cells, records, artifacts)
    assert plan.done_cells == {cells[1].cell_id}
    assert f"model-{cached.model_key}" not in plan.jobs
    assert plan.jobs[f"cell-{cached.cell_id}"].deps == ()
    assert f"cell-{cells[1].cell_id}" not in plan.jobs
    assert sum(job.kind == "model" for job in plan) == 3


class ScriptedExecutor:
    """Two slots; every job succeeds at once except those listed in ``fail``."""

    slots = 2

    def __init__(self, fail: set[str]) -> None:
        self.fail = fail
        self.started: list[str] = []
        self._queue: list[tuple[int, Job]] = []

    def where(self, slot: int) -> str:
        return f"slot {slot}"

    def start(self, slot: int, job: Job) -> None:
        self.started.append(job.job_id)
        self._queue.append((slot, job))

    def wait(self) -> list[tuple[int, JobResult]]:
        slot, job = self._queue.pop(0)
        if job.job_id in self.fail:
            return [(slot, JobResult(job.job_id, False, error="ValueError: scripted", traceback="Traceback: scripted"))]
        record = {"cell_id": job.cell.cell_id, "ba": 1.0, "asr": 2.0} if job.kind == "cell" else None
        return [(slot, JobResult(job.job_id, True, record=record))]

    def close(self) -> None:
        pass


def test_a_failed_job_skips_its_dependents_and_nothing_else(tmp_path, shared_fit):
    config = _config()
    cells = compile_grid(config)
    run_dir = tmp_path / "run"
    records = RecordStore(run_dir)
    plan = build_plan(cells, records, ArtifactStore(tmp_path / "cache"))
    broken = next(job for job in plan if job.kind == "defense")
    executor = ScriptedExecutor({broken.job_id})
    book = JobBook(run_dir, "test")
    book.begin(plan)
    outcome = execute_plan(plan, executor, book, records)
    book.end("finished")

    skipped = plan.dependents(broken.job_id)
    assert len(skipped) == 3  # the three intensities that share the fitted state
    assert set(outcome.failed) == {broken.job_id, *skipped}
    assert not set(skipped) & set(executor.started)  # never started
    assert outcome.records_written == len(cells) - 3
    assert len(outcome.finished) + len(outcome.failed) == len(plan)
    _, statuses = run_status(run_dir)
    failed = [s for s in statuses if s.state == "failed"]
    assert len(failed) == 3 and all("ValueError: scripted" in s.detail for s in failed)
    assert (run_dir / "logs" / f"{broken.job_id}.log").read_text().count("Traceback: scripted") == 1


def test_two_workers_never_train_the_same_model(tmp_path, monkeypatch):
    """Two runners (as in two worker processes) ask for one missing model at once: one trains it."""
    config = _config(attacks=["badnets"], defenses=["none"], seeds=[0])
    cell = compile_grid(config)[0]
    paths = DataPaths(Path("unused"), tmp_path / "cache")
    runners = [CellRunner(config, paths, ArtifactStore(tmp_path / "cache"), torch.device("cpu")) for _ in range(2)]
    trained: list[int] = []

    def slow_training(model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        trained.append(1)
        time.sleep(0.5)  # long enough for the other runner to arrive while the lock is held
        torch.nn.init.constant_(model.head.weight, 0.25)
        return model

    monkeypatch.setattr(bench.orchestration.runner, "train_classifier", slow_training)
    models: list[torch.nn.Module] = []

    def work(runner: CellRunner) -> None:
        data = runner.cell_data(cell)
        models.append(runner.backdoored_model(cell, data, runner.fitted_attack(cell, data))[0])

    threads = [threading.Thread(target=work, args=(r,)) for r in runners]
    with one_thread():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(trained) == 1
    assert len(models) == 2 and all(float(m.head.weight.detach().mean()) == 0.25 for m in models)


def test_a_corrupted_artifact_is_retrained_on_resume(tmp_path, monkeypatch):
    """A model file that fails its checksum is treated as missing: the job that needs it trains it again."""
    trained: list[int] = []

    def fake_training(model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        trained.append(1)
        return model

    monkeypatch.setattr(bench.orchestration.runner, "train_classifier", fake_training)
    config = _config(attacks=["badnets"], defenses=["none"], seeds=[0])
    paths = DataPaths(Path("unused"), tmp_path / "cache")
    cells, computed, _ = run_grid(config, tmp_path / "run", paths, "cpu", workers=1)  # in this process: counted
    assert computed == 1 and len(trained) == 1
    (model_file,) = (tmp_path / "cache" / "models").glob("*.pt")
    raw = bytearray(model_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the payload
    model_file.write_bytes(bytes(raw))
    RecordStore(tmp_path / "run").path(cells[0].cell_id).unlink()
    _, computed, _ = run_grid(config, tmp_path / "run", paths, "cpu", workers=1)
    assert computed == 1 and len(trained) == 2
    assert ArtifactStore(tmp_path / "cache").load("models", cells[0].model_key) is not None


def test_a_test_subset_shares_the_model_but_not_the_cell(shared_fit):
    full = compile_grid(_config(datasets=["mnist5k"]))
    subset = compile_grid(_config(datasets=[{"name": "mnist5k", "test_subset": 500}]))
    train_subset = compile_grid(_config(datasets=[{"name": "mnist5k", "train_subset": 2000}]))
    assert [c.model_key for c in full] == [c.model_key for c in subset]
    assert not {c.cell_id for c in full} & {c.cell_id for c in subset}
    assert not {c.model_key for c in full} & {c.model_key for c in train_subset}


def test_fp32_evaluation_shares_the_model_and_fit_but_not_the_cell(shared_fit):
    bf16 = compile_grid(_config())
    fp32 = compile_grid(_config(eval_amp=False))
    assert [(c.model_key, c.defense_key) for c in bf16] == [(c.model_key, c.defense_key) for c in fp32]
    assert not {c.cell_id for c in bf16} & {c.cell_id for c in fp32}
    assert [c.cell_id for c in compile_grid(_config(eval_amp=True))] == [c.cell_id for c in bf16]


def test_compute_settings_that_change_numbers_enter_every_key_and_defaults_keep_theirs(shared_fit):
    """A model trained with two threads per job is another float result: the cache must not hand
    it to a grid that asks for one thread (and vice versa); spelling out a default changes nothing."""
    default = compile_grid(_config())
    keys = lambda cells: [(c.data_key, c.model_key, c.defense_key, c.cell_id) for c in cells]  # noqa: E731
    assert keys(compile_grid(_config(threads_per_job=1, deterministic=False))) == keys(default)
    for changed in (compile_grid(_config(threads_per_job=2)), compile_grid(_config(deterministic=True))):
        for mine, theirs in zip(changed, default):
            assert mine.model_key != theirs.model_key and mine.cell_id != theirs.cell_id
            assert (mine.defense_key is None) == (theirs.defense_key is None)
            assert mine.defense_key is None or mine.defense_key != theirs.defense_key
