"""Per-model training settings: ``models: [{name: ..., train: {...}}]`` merged over the grid's ``train``.

The paper trains VGG-16 at lr 0.01 and its ViT at lr 1e-3 where the other models use 0.1; a grid
gives a model such settings of its own. They must reach that model's training, enter that
model's cache key (and only its), and be validated with the rest of the grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import bench.orchestration.runner
from bench.core.data import DataPaths
from bench.core.errors import BenchError
from bench.orchestration.config import ModelSpec, load_config, validate
from bench.orchestration.execute import run_grid
from bench.orchestration.grid import compile_grid
from tests.gridrun import one_thread

BASE = {
    "datasets": [{"name": "mnist5k", "train_subset": 1000, "test_subset": 300}],
    "models": [{"name": "small_cnn", "width": 4}],
    "attacks": ["badnets"],
    "defenses": ["none"],
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "milestones": [], "crop_padding": 2, "flip": False},
    "tsne": {"per_class": 0},
}
SLOW = {"name": "small_cnn", "width": 8, "train": {"lr": 0.01, "epochs": 2}}


def grid(models: list, **changes) -> dict:
    return {**BASE, "models": models, **changes}


def keys_by_model(raw: dict) -> dict[str, set[str]]:
    """Model cache keys of a compiled grid, by the model entry's label."""
    out: dict[str, set[str]] = {}
    for cell in compile_grid(validate(raw, "grid.yaml")):
        out.setdefault(cell.model.display(), set()).add(cell.model_key)
    return out


def test_an_entry_keeps_its_train_settings_apart_from_its_parameters() -> None:
    config = validate(grid([BASE["models"][0], SLOW]), "grid.yaml")
    plain, slow = config.models
    assert isinstance(slow, ModelSpec) and slow.params == {"width": 8} and slow.train == {"lr": 0.01, "epochs": 2}
    assert config.train_for(plain) == config.train
    recipe = config.train_for(slow)
    assert (recipe.lr, recipe.epochs) == (0.01, 2)
    # Everything the entry does not set comes from the grid's train.
    assert (recipe.batch_size, recipe.crop_padding, recipe.flip) == (64, 2, False)
    # The resolved config (records, run snapshots) keeps the overrides with their entry.
    assert config.resolved()["models"][1]["train"] == {"lr": 0.01, "epochs": 2}


def test_an_override_changes_that_model_key_only() -> None:
    plain = BASE["models"][0]
    without = keys_by_model(grid([plain, {"name": "small_cnn", "width": 8}]))
    with_override = keys_by_model(grid([plain, SLOW]))
    assert with_override["small_cnn(width=4)"] == without["small_cnn(width=4)"]  # the other model is untouched
    assert with_override["small_cnn(width=8)"].isdisjoint(without["small_cnn(width=8)"])
    # A setting that repeats the grid's value is the same recipe, so the same model.
    same = keys_by_model(grid([plain, {"name": "small_cnn", "width": 8, "train": {"lr": 0.05}}]))
    assert same["small_cnn(width=8)"] == without["small_cnn(width=8)"]
    # A change of the grid's train reaches every model whose entry does not set it.
    other = keys_by_model(grid([plain, SLOW], train={**BASE["train"], "batch_size": 32}))
    assert other["small_cnn(width=4)"].isdisjoint(without["small_cnn(width=4)"])
    assert other["small_cnn(width=8)"].isdisjoint(with_override["small_cnn(width=8)"])


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"lr": -1}, r"^grid.yaml: models\[1\].train: lr must be > 0, got -1$"),
        ({"lrr": 0.1}, r"^grid.yaml: models\[1\].train: unknown setting 'lrr' \(did you mean 'lr'\?\); valid: "),
        ({"schedule": "cosine"}, r"^grid.yaml: models\[1\].train: schedule must be one of 'multistep', 'onecycle', "),
        (3, r"^grid.yaml: models\[1\].train must be "),
    ],
)
def test_bad_overrides_are_one_line_before_any_work(train, message) -> None:
    with pytest.raises(BenchError, match=message):
        validate(grid([BASE["models"][0], {"name": "small_cnn", "width": 8, "train": train}]), "grid.yaml")


def test_entries_that_differ_only_in_train_are_two_models_with_labels() -> None:
    twice = grid([{"name": "small_cnn", "width": 4}, {"name": "small_cnn", "width": 4, "train": {"lr": 0.01}}])
    with pytest.raises(BenchError, match="same label 'small_cnn\\(width=4\\)'; give them distinct 'label's"):
        validate(twice, "grid.yaml")
    twice["models"][1]["label"] = "small_cnn lr 0.01"
    keys = keys_by_model(twice)
    assert keys["small_cnn(width=4)"].isdisjoint(keys["small_cnn lr 0.01"])


def test_the_set_option_gives_a_model_its_own_settings(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(BASE))
    config = load_config(path, ["models=[{name: small_cnn, width: 4, train: {lr: 0.02}}]"])
    assert config.train_for(config.models[0]).lr == 0.02 and config.models[0].params == {"width": 4}


def test_each_model_trains_with_its_own_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[tuple[int, int, float]] = []
    real = bench.orchestration.runner.train_classifier

    def spy(model, images, labels, recipe, *args, **kwargs):
        used.append((model.head.in_features, recipe.epochs, recipe.lr))
        return real(model, images, labels, recipe, *args, **kwargs)

    monkeypatch.setattr(bench.orchestration.runner, "train_classifier", spy)
    config = validate(grid([BASE["models"][0], SLOW]), "grid.yaml")
    with one_thread():
        cells, computed, _ = run_grid(config, tmp_path / "run", DataPaths(tmp_path, tmp_path / "cache"), "cpu",
                                      workers=1)  # fmt: skip
    assert computed == 2
    # small_cnn's head reads 4 x width features: width 4 -> 16, width 8 -> 32.
    assert sorted(used) == [(16, 1, 0.05), (32, 2, 0.01)]
    records = [json.loads(p.read_text()) for p in (tmp_path / "run" / "records").glob("*.json")]
    by_label = {r["model_label"]: r["train"] for r in records}
    assert (by_label["small_cnn(width=4)"]["lr"], by_label["small_cnn(width=4)"]["epochs"]) == (0.05, 1)
    assert (by_label["small_cnn(width=8)"]["lr"], by_label["small_cnn(width=8)"]["epochs"]) == (0.01, 2)


def test_the_architecture_grids_give_vgg_and_the_vit_their_paper_learning_rates() -> None:
    repo = Path(__file__).resolve().parent.parent
    gpu = load_config(repo / "configs" / "cifar10_architectures.yaml")
    cpu = load_config(repo / "configs" / "cifar10_architectures_cpu.yaml")
    for config in (gpu, cpu):
        lrs = {spec.name: config.train_for(spec).lr for spec in config.models}
        assert lrs == {"cifar_resnet18": 0.1, "resnet50": 0.1, "vgg16": 0.01, "inception_v3": 0.1,
                       "densenet121": 0.1, "vit_small": 0.001}  # fmt: skip
    assert gpu.train_for(gpu.models[0]).epochs == 150 and cpu.train_for(cpu.models[0]).epochs == 1
    # The CPU twin runs the same path: the same models, attacks and defenses, at smaller sizes.
    assert [m.name for m in cpu.models] == [m.name for m in gpu.models]
    assert [a.name for a in cpu.attacks] == [a.name for a in gpu.attacks]
    assert [d.name for d in cpu.defenses] == [d.name for d in gpu.defenses]
