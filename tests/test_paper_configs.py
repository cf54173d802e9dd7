"""The paper grid and its fast-recipe twin: the same experiment except how the models are trained."""

from __future__ import annotations

from pathlib import Path

from bench.orchestration.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# What configs/cifar10_paper_fast.yaml's header says the fast recipe changes, and nothing else.
FAST_RECIPE_CHANGES = {"epochs", "batch_size", "lr", "schedule", "label_smoothing"}


def _resolved(name: str) -> dict:
    return load_config(CONFIGS / name).resolved()


def test_the_fast_paper_grid_is_the_paper_grid_except_train_and_name():
    paper, fast = _resolved("cifar10_paper.yaml"), _resolved("cifar10_paper_fast.yaml")
    assert paper.keys() == fast.keys()
    differing = {key for key in paper if paper[key] != fast[key]}
    assert differing == {"train", "name"}
    assert fast["name"] == "cifar10_paper_fast"


def test_the_fast_paper_grid_changes_exactly_the_fast_recipe_settings():
    paper, fast = _resolved("cifar10_paper.yaml")["train"], _resolved("cifar10_paper_fast.yaml")["train"]
    recipe = _resolved("fast_cifar_resnet18.yaml")["train"]
    changed = {key for key in paper if paper[key] != fast[key]}
    assert changed == FAST_RECIPE_CHANGES
    assert {key: fast[key] for key in changed} == {key: recipe[key] for key in changed}
    assert paper["epochs"] == 150 and paper["schedule"] == "multistep" and fast["epochs"] == 40


def test_the_paper_grid_has_its_seven_attacks_and_six_defense_columns():
    paper = load_config(CONFIGS / "cifar10_paper.yaml")
    assert [a.name for a in paper.attacks] == ["badnets", "blended", "wanet", "physical_ba", "batt",
                                               "label_consistent", "adaptive_patch"]  # fmt: skip
    assert [d.name for d in paper.defenses] == ["none", "shrinkpad", "bdmae", "btidbf_u", "btidbf_p", "refine"]
    assert [m.name for m in paper.models] == ["cifar_resnet18"]
