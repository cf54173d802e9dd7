"""`run_bench.py show-triggers`: one PNG with a clean image and its poisoned version per attack."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from PIL import Image

from bench.cli import main
from bench.core.registry import ATTACKS
from bench.report.triggers import default_attacks, trigger_examples


def test_examples_cover_every_registered_attack(mnist) -> None:
    examples = trigger_examples(default_attacks(), mnist, seed=0, index=3)
    assert [e.label for e in examples] == ATTACKS.names()
    for ex in examples:
        assert ex.clean.shape == ex.poisoned.shape == (1, 28, 28)
        assert torch.equal(ex.clean, examples[0].clean), "every row shows the same clean image"
        assert (ex.label == "clean") == torch.equal(ex.clean, ex.poisoned)


def test_cli_writes_one_png_row_per_attack(tmp_path: Path, capsys) -> None:
    out = tmp_path / "grid.png"
    code = main(["show-triggers", "--dataset", "mnist5k", "--out", str(out), "--cache-dir", str(tmp_path / "c")])
    assert code == 0 and f"{len(ATTACKS.names())} attacks" in capsys.readouterr().out
    with Image.open(out) as img:
        width, height = img.size
    assert height > 2 * width  # one row per attack, three panels per row


def test_cli_uses_a_grid_files_attacks_and_parameters(tmp_path: Path, capsys, mnist) -> None:
    grid = {"datasets": ["mnist5k"], "models": ["small_cnn"], "defenses": ["none"],
            "attacks": [{"name": "batt", "angle": 45}, {"name": "badnets", "size": 5, "label": "big patch"}]}  # fmt: skip
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "two.png"
    assert main(["show-triggers", str(path), "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    assert "2 attacks" in capsys.readouterr().out and out.is_file()
    examples = trigger_examples([("big patch", ATTACKS.create("badnets", {"size": 5}))], mnist)
    assert examples[0].label == "big patch"
    assert int((examples[0].poisoned != examples[0].clean).sum()) <= 25
