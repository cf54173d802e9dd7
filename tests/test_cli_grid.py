"""The grid end to end on real MNIST: caching, records, tables, and every bad-input case."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import bench.orchestration.runner
import bench.report.tsne
from bench.cli import main
from bench.core.data import DataPaths
from bench.orchestration.config import load_config
from bench.orchestration.execute import run_grid

REPO = Path(__file__).resolve().parent.parent

TINY = {
    "datasets": ["mnist5k"],
    "models": [{"name": "small_cnn", "width": 8}],
    "attacks": ["badnets"],
    "defenses": ["none", {"name": "shrinkpad", "pad": [2, 4]}],
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.05, "milestones": [], "flip": False},
}


def _write(tmp_path: Path, config: dict | str, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def test_rerun_skips_cells_and_new_intensity_reuses_the_model(tmp_path, monkeypatch):
    paths = DataPaths(tmp_path / "data", tmp_path / "cache")
    config = load_config(_write(tmp_path, TINY))
    cells, computed, table = run_grid(config, tmp_path / "run", paths, "cpu")
    assert len(cells) == 3 and computed == 3
    assert len(list((tmp_path / "cache" / "models").glob("*.pt"))) == 1  # one model for 3 cells
    assert "shrinkpad(pad=2) BA" in table and "badnets" in [line.split("|")[1].strip() for line in table.splitlines()[4:]]

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was retrained")

    monkeypatch.setattr(bench.orchestration.runner, "train_classifier", no_training)
    _, computed, table_again = run_grid(config, tmp_path / "run", paths, "cpu")
    assert computed == 0 and table_again == table
    wider = load_config(_write(tmp_path, TINY), ["defenses=[none, {name: shrinkpad, pad: [2, 4, 6]}]"])
    cells, computed, _ = run_grid(wider, tmp_path / "run", paths, "cpu")
    assert len(cells) == 4 and computed == 1

    frame = pd.read_csv(tmp_path / "run" / "cells.csv")
    assert {"dataset", "model", "attack", "defense", "intensity", "seed", "ba", "asr"} <= set(frame.columns)
    assert len(frame) == 4 and sorted(frame["intensity"].dropna().tolist()) == [2, 4, 6]
    record = json.loads(next((tmp_path / "run" / "records").glob("*.json")).read_text())
    assert {"config", "versions", "seconds", "seed", "ba", "asr"} <= set(record)
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_default_grid_meets_the_bar(tmp_path, capsys, monkeypatch):
    """`run_bench.py` with configs/quick.yaml: no-defense BA and ASR >= 95% for both attacks."""
    argv = ["run", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    code = main(argv)
    assert code == 0
    first = capsys.readouterr()
    assert "### mnist5k / small_cnn" in first.out
    # stderr is not a terminal here: a line per job (2 trainings, 4 cells) in place of the progress bar
    progress = [line for line in first.err.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in progress] == [f"[{k}/6" for k in range(1, 7)]
    assert all(re.search(r": done in \d+ s$", line) for line in progress), progress
    assert list((tmp_path / "run" / "figures").glob("tsne-*.png"))

    def no_redraw(*args, **kwargs):
        raise AssertionError("a finished grid redrew its t-SNE figure")

    monkeypatch.setattr(bench.report.tsne, "embed", no_redraw)
    assert main(argv) == 0  # the rerun only rebuilds tables and the report
    captured = capsys.readouterr()
    assert "(0 computed, 4 already done)" in captured.out and "warning" not in captured.err
    frame = pd.read_csv(tmp_path / "run" / "cells.csv")
    none = frame[frame["defense"] == "none"].set_index("attack")
    assert set(none.index) == {"badnets", "blended"}
    assert (none["ba"] >= 95).all() and (none["asr"] >= 95).all(), none[["ba", "asr"]]
    assert (tmp_path / "run" / "table.tex").read_text().count(r"\toprule") == 1


BAD_INPUTS = [
    ({**TINY, "attacks": ["badnet"]}, [], "unknown attack 'badnet'. Did you mean 'badnets'?"),
    ("datasets: [mnist5k\nmodels: [small_cnn]\n", [], "malformed YAML at {path}:2:"),
    (TINY, ["poison.rate=1.5"], "poison.rate must be in (0, 1), got 1.5"),
    (TINY, ["train.epochs=-1"], "train.epochs must be >= 1, got -1"),
    ({**TINY, "datasets": [{"name": "cifar10", "download": False}]}, ["--data-root", "{tmp}/none"],
     "CIFAR-10 not found under data root"),
    ({**TINY, "epochz": 3}, [], "unknown setting 'epochz'; valid: attacks, datasets"),
    ({**TINY, "attacks": [{"name": "badnets", "size": 0}]}, [], "badnets: size must be >= 1"),
    ({**TINY, "attacks": [{"name": "blended", "alpha": 0.1, "colour": 1}]}, [],
     "blended: unknown parameter 'colour'; valid: alpha, pattern, pattern_seed"),
    ({**TINY, "defenses": [{"name": "shrinkpad", "pad": []}]}, [], "list of pad values is empty"),
    ({**TINY, "models": ["vgg99"]}, [], "unknown model 'vgg99'"),
]  # fmt: skip


@pytest.mark.parametrize("config,extra,message", BAD_INPUTS)
def test_bad_input_exits_2_with_one_message_and_writes_nothing(tmp_path, capsys, config, extra, message):
    path = _write(tmp_path, config)
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    sets = [x for a in args if "=" in a and not a.startswith("-") for x in ("--set", a)]
    flags = [a for a in args if "=" not in a or a.startswith("-")]
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *sets, *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message.format(path=path) in err, err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_missing_config_file_and_table_of_a_non_run(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["table", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_the_script_prints_no_traceback_on_bad_input(tmp_path):
    path = _write(tmp_path, {**TINY, "defenses": ["refin"]})
    proc = subprocess.run([sys.executable, str(REPO / "run_bench.py"), "run", str(path), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown defense 'refin'" in proc.stderr


def test_list_and_help(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "badnets" in out and "shrinkpad" in out and "mnist5k" in out and "small_cnn" in out
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0 and "--set" in capsys.readouterr().out


def test_a_reader_that_leaves_early_is_not_an_error():
    """`run_bench.py list --verbose | head -1`: the closed pipe ends the command quietly, exit 0."""
    proc = subprocess.Popen([sys.executable, str(REPO / "run_bench.py"), "list", "--verbose"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)  # fmt: skip
    proc.stdout.close()  # before the child has written anything (it is still importing torch)
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
