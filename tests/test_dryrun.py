"""``run --dry-run``: validates, lists cells and remaining work, and runs nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from bench.cli import main
from bench.core.registry import DEFENSES
from bench.orchestration.config import load_config
from bench.orchestration.grid import compile_grid

REPO = Path(__file__).resolve().parent.parent

TINY = {
    "datasets": ["mnist5k"],
    "models": [{"name": "small_cnn", "width": 4}],
    "attacks": ["badnets"],
    "defenses": ["none", {"name": "shrinkpad", "pad": [2, 4]}],
    "train": {"epochs": 1, "batch_size": 256, "lr": 0.05, "milestones": [], "flip": False},
}


def _dry_run(capsys, tmp_path: Path, config: Path) -> tuple[int, str]:
    code = main(
        ["run", str(config), "--dry-run", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    )
    return code, capsys.readouterr().out


def test_the_paper_grid_validates_and_lists_every_cell_without_running(tmp_path, capsys):
    config = yaml.safe_load((REPO / "configs" / "cifar10_paper.yaml").read_text())
    code, out = _dry_run(capsys, tmp_path, REPO / "configs" / "cifar10_paper.yaml")
    assert code == 0
    todo = [line for line in out.splitlines() if line.strip().startswith("[todo]")]
    assert len(todo) == len(config["attacks"]) * len(config["defenses"]) == 42
    for attack in ("badnets", "blended", "wanet", "physical_ba", "batt", "label_consistent", "adaptive_patch"):
        for defense in ("none", "shrinkpad", "bdmae", "btidbf", "refine"):
            assert any(f" {attack}" in line and f"/ {defense}" in line for line in todo), (attack, defense)
    # 7 backdoored models + the clean model the clean-label attack crafts its poison with,
    # each 150 epochs over the 40,000 images the attacker keeps.
    assert "model trainings: 8 x 150 epochs -> 48,000,000 image-passes" in out
    assert re.search(r"defense fits: 28 \(bdmae x7, btidbf x14, refine x7\)", out)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_dry_run_after_a_run_reports_the_finished_cells(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(TINY))
    code, before = _dry_run(capsys, tmp_path, path)
    assert code == 0 and before.count("[todo]") == 3 and "model trainings: 1 x 1 epochs -> 3,200 image-passes" in before
    assert (
        main(["run", str(path), "--no-tsne", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
        == 0
    )
    capsys.readouterr()
    code, after = _dry_run(capsys, tmp_path, path)
    assert code == 0 and after.count("[done]") == 3 and "[todo]" not in after
    assert "model trainings: 0 x 1 epochs" in after and "(3 of 3 cells already done)" in after


def test_dry_run_of_a_bad_config_exits_2(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**TINY, "defenses": ["refin"]}))
    code = main(["run", str(path), "--dry-run", "--out", str(tmp_path / "run")])
    assert code == 2 and "unknown defense 'refin'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fit_epochs_count_every_training_phase():
    assert DEFENSES.get("refine")(epochs=7).fit_epochs() == 7
    btidbf = DEFENSES.get("btidbf_u")(pretrain_epochs=10, mask_epochs=3, invert_epochs=8, defend_epochs=5, rounds=2)
    assert btidbf.fit_epochs() == 10 + 2 * (3 + 8 + 5)
    assert DEFENSES.get("shrinkpad")().fit_epochs() == 0
    assert DEFENSES.get("bdmae")(mae_train={"epochs": 4}).fit_epochs() == 4


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cells = compile_grid(load_config(path))
    assert cells and len({c.cell_id for c in cells}) == len(cells)
