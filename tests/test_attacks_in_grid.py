"""The new attacks inside a real grid run (MNIST, one epoch): the ``clean`` reference row, the
clean model a clean-label attack asks the runner for (the same model), and the train-time hook."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

import bench.orchestration.runner
from attacks.physical_ba import PhysicalBA
from bench.core.data import DataPaths
from bench.orchestration.config import load_config
from bench.orchestration.execute import run_grid

GRID = {
    "datasets": ["mnist5k"],
    "models": [{"name": "small_cnn", "width": 8}],
    "attacks": ["clean", {"name": "label_consistent", "steps": 3}, {"name": "physical_ba", "size": 4}],
    "defenses": ["none"],
    "holdout": 0.75,  # 1,000 training digits: 7 batches of 128 per epoch
    "train": {"epochs": 2, "batch_size": 128, "lr": 0.05, "milestones": [], "flip": False},
}


def test_clean_reference_clean_label_attack_and_physical_transforms_run_in_a_grid(tmp_path: Path, monkeypatch) -> None:
    augmented = []
    original = PhysicalBA.train_augment

    def spy(self, x, gen):
        augmented.append(x.shape[0])
        return original(self, x, gen)

    monkeypatch.setattr(PhysicalBA, "train_augment", spy)
    trained = []
    real_train = bench.orchestration.runner.train_classifier

    def counting_train(*args, **kwargs):
        trained.append(kwargs["desc"].split("[")[-1].rstrip("]"))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(bench.orchestration.runner, "train_classifier", counting_train)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(GRID))
    paths = DataPaths(tmp_path / "data", tmp_path / "cache")
    cells, computed, table = run_grid(load_config(path), tmp_path / "run", paths, "cpu", workers=1)  # spied here
    assert computed == 3
    frame = pd.read_csv(tmp_path / "run" / "cells.csv").set_index("attack")
    # clean: a model that learnt something of the digits (above 10% chance) and has no backdoor.
    assert frame.loc["clean", "ba"] > 25
    assert frame.loc["clean", "asr"] < 30
    # Three models: label_consistent's clean model is the clean row's model, not a fourth one.
    assert len(list((tmp_path / "cache" / "models").glob("*.pt"))) == 3
    assert trained == ["clean", "label_consistent(steps=3)", "physical_ba(size=4)"]
    # PhysicalBA's transforms ran on every training batch (2 epochs x 1000 // 128 batches).
    assert len(augmented) == 14 and set(augmented) == {128}
    assert "| label_consistent(steps=3) |" in table

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was retrained")

    monkeypatch.setattr(bench.orchestration.runner, "train_classifier", no_training)
    _, computed, _ = run_grid(load_config(path, ["seeds=[0]"]), tmp_path / "run2", paths, "cpu", workers=1)
    assert computed == 3  # new run directory, every model (and the clean one) from the cache
