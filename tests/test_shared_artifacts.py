"""Shared defense sub-results are artifacts: built once per key across workers and reruns.

BDMAE's autoencoder depends on the defender's benign data and its settings, not on the
backdoored model; BTI-DBF's pre-trained generator also on the model, not on the defense mode.
Both are asked for through the defense context, which the grid runner backs with the artifact
cache; the job log and the records say which were built and which loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gridrun import one_thread, run_cli, write_grid

from bench.core.data import DataPaths
from bench.orchestration.config import GridConfig
from bench.orchestration.grid import compile_grid
from bench.orchestration.runner import CellRunner
from bench.orchestration.store import ArtifactStore
from defenses.base import MissingArtifactError

MAE_KIND = "shared-bdmae-mae"
TINY_BDMAE = {
    "name": "bdmae", "init_rounds": 1, "init_masks": 2, "refine_rounds": 1, "num_thresholds": 2,
    "mae": {"embed_dim": 16, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
            "decoder_num_heads": 2},
    "mae_train": {"epochs": 2, "batch_size": 64, "warmup_epochs": 0},
}  # fmt: skip
GRID = {
    "datasets": [{"name": "mnist5k", "train_subset": 1000, "test_subset": 60}],
    "models": [{"name": "small_cnn", "width": 4}],
    "attacks": ["badnets", {"name": "blended", "alpha": 0.2}],
    "defenses": [TINY_BDMAE],
    "seeds": [0],
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "milestones": [], "crop_padding": 2, "flip": False},
}


def artifact_events(run_dir: Path) -> list[dict]:
    """Every artifact event the run's job log recorded (one entry per build or load)."""
    events = []
    for path in sorted((run_dir / "jobs").glob("*.json")):
        events += json.loads(path.read_text()).get("artifacts", [])
    return events


def builds(events: list[dict], kind: str) -> int:
    return sum(e["kind"] == kind and e["action"] == "built" for e in events)


def test_a_grid_trains_the_mae_once_across_workers_and_reruns(tmp_path) -> None:
    config, cache = write_grid(tmp_path / "grid.yaml", GRID), tmp_path / "cache"
    done = run_cli(config, tmp_path / "run", cache, "--workers", "2")
    assert done.returncode == 0, done.stderr
    events = artifact_events(tmp_path / "run")
    assert builds(events, "models") == 2  # one backdoored model per attack ...
    assert builds(events, "defenses") == 2  # ... and one BDMAE state per model ...
    assert builds(events, MAE_KIND) == 1  # ... but one autoencoder for both
    assert sum(e["kind"] == MAE_KIND and e["action"] == "loaded" for e in events) >= 1
    (mae_file,) = (cache / MAE_KIND).glob("*.pt")
    assert len(list((cache / "defenses").glob("*.pt"))) == 2
    for state_file in (cache / "defenses").glob("*.pt"):  # the states refer to the MAE, not copy it
        assert state_file.stat().st_size < mae_file.stat().st_size / 4

    again = run_cli(config, tmp_path / "run", cache, "--workers", "2")
    assert again.returncode == 0 and "0 computed, 2 already done" in again.stdout
    assert builds(artifact_events(tmp_path / "run"), MAE_KIND) == 1  # no new job, nothing rebuilt

    # Another BDMAE setting fits new defense states on the cached models and the cached MAE.
    other = {**GRID, "defenses": [{**TINY_BDMAE, "alpha": 0.8}]}
    third = run_cli(write_grid(tmp_path / "other.yaml", other), tmp_path / "other", cache, "--workers", "2")
    assert third.returncode == 0, third.stderr
    events = artifact_events(tmp_path / "other")
    assert builds(events, MAE_KIND) == 0 and builds(events, "models") == 0 and builds(events, "defenses") == 2
    # loaded by both fits, and again by both evaluations (from the states' references)
    assert sum(e["kind"] == MAE_KIND and e["action"] == "loaded" for e in events) == 4
    records = [json.loads(p.read_text()) for p in (tmp_path / "other" / "records").glob("*.json")]
    assert all(any(e["kind"] == "defenses" for e in r["artifacts"]) for r in records)


def test_a_state_whose_mae_is_gone_is_refitted(tmp_path) -> None:
    """The defense state only refers to the autoencoder: if the MAE file is deleted, the cell
    job fits the defense again (rebuilding the MAE) instead of failing."""
    config = GridConfig.model_validate({**GRID, "attacks": ["badnets"]})
    (cell,) = compile_grid(config)
    store = ArtifactStore(tmp_path / "cache")
    runner = CellRunner(config, DataPaths(tmp_path / "data", tmp_path / "cache"), store, torch.device("cpu"))
    with one_thread():
        data = runner.cell_data(cell)
        model, _ = runner.backdoored_model(cell, data, runner.fitted_attack(cell, data))
        first, cached = runner.defense(cell, data, model)
        assert not cached
        state = store.load("defenses", cell.defense_key)
        assert set(state) == {"config", "mae"} and state["mae"]["kind"] == "bdmae-mae"
        with pytest.raises(MissingArtifactError):
            runner.defense_context(cell, first).load("bdmae-mae", "0" * 16)
        (mae_file,) = (tmp_path / "cache" / MAE_KIND).glob("*.pt")
        mae_file.unlink()
        runner.take_events()
        again, cached = runner.defense(cell, data, model)
    actions = [(e["kind"], e["action"]) for e in runner.take_events()]
    assert not cached and actions == [(MAE_KIND, "built"), ("defenses", "built")]
    assert mae_file.exists()
    x = torch.rand(4, 1, 28, 28)
    first.bind(model, torch.device("cpu"), 7, first.ctx)
    again.bind(model, torch.device("cpu"), 7, again.ctx)
    assert torch.equal(first.predict(x), again.predict(x))  # the rebuilt MAE is the same MAE
