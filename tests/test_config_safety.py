"""Config loading: alias bombs are refused, anchors and merge keys still work, duplicates are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench.cli import main
from bench.core.errors import BenchError
from bench.core.safe_yaml import MAX_YAML_NODES
from bench.orchestration.config import load_config, parse_overrides, read_yaml

REPO = Path(__file__).resolve().parent.parent
BASE = "datasets: [mnist5k]\nmodels: [small_cnn]\ndefenses: [none]\n"


def laughs(levels: int = 9) -> list[str]:
    """Nested aliases, nine per level: a few hundred bytes that stand for 9**levels values."""
    items = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    return items + [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]


def billion_laughs(levels: int = 9) -> str:
    """A grid file with the laughs where the grid accepts any value (an attack parameter), so
    nothing rejects them early."""
    return BASE + "attacks:\n  - name: blended\n    pattern:\n" + "".join(f"      - {i}\n" for i in laughs(levels))


def test_alias_bomb_is_refused_with_one_line(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    assert len(path.read_bytes()) < 700 and 9**9 > MAX_YAML_NODES
    with pytest.raises(BenchError, match="aliases expand to more than 100,000 values"):
        read_yaml(path)
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: refusing the YAML: its aliases expand to more than 100,000 values (an alias bomb?)\n"
    with pytest.raises(BenchError, match="--set attacks: its aliases expand"):
        parse_overrides(["attacks=[{name: blended, pattern: [" + ", ".join(laughs()) + "]}]"])


def test_moderate_aliases_and_recursive_aliases(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text(billion_laughs(levels=4))  # 9**4 = 6,561 values: big, but a legitimate document
    assert len(read_yaml(ok)["attacks"][0]["pattern"][3]) == 9
    loop = tmp_path / "loop.yaml"
    loop.write_text(BASE + "attacks: &a [badnets, *a]\n")
    with pytest.raises(BenchError, match="recursive alias"):
        read_yaml(loop)


def test_anchors_and_merge_keys_of_the_shipped_configs_still_work():
    config = load_config(REPO / "configs" / "refine_mnist.yaml")
    refines = [d for d in config.defenses if d.name == "refine"]
    assert [d.label for d in refines] == ["refine", "refine (no remap)", "refine (no SupCon)"]
    assert all(d.params["width"] == 8 and d.params["epochs"] == 30 for d in refines)
    assert refines[1].params["remap"] is False and refines[2].params["supcon_weight"] == 0
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)  # every shipped grid still loads


GRID = {"datasets": ["mnist5k"], "models": ["small_cnn"], "attacks": ["badnets"], "defenses": ["none"]}


@pytest.mark.parametrize("override, message", [
    ({"attacks": ["badnets", {"name": "blended"}, "badnets"]}, "attacks: 'badnets' is listed twice"),
    ({"attacks": [{"name": "blended", "alpha": 0.2}, {"alpha": 0.2, "name": "blended"}]},
     "attacks: 'blended(alpha=0.2)' is listed twice"),
    ({"attacks": [{"name": "badnets", "label": "x"}, {"name": "blended", "label": "x"}]},
     "attacks: two entries have the same label 'x'"),
    ({"seeds": [0, 1, 0]}, "seeds: seed 0 is listed twice"),
    ({"datasets": ["mnist5k", "mnist5k"]}, "datasets: 'mnist5k' is listed twice"),
    ({"models": ["small_cnn", {"name": "small_cnn"}]}, "models: 'small_cnn' is listed twice"),
])  # fmt: skip
def test_duplicate_entries_are_refused(tmp_path, capsys, override, message):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**GRID, **override}))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {message}") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_entries_equal_once_defaults_are_filled_in_are_refused(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**GRID, "attacks": ["badnets", {"name": "badnets", "pattern": "white"}]}))
    for extra in ([], ["--dry-run"]):
        assert main(["run", str(path), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                     *extra]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert "two grid entries are the same cell" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]
