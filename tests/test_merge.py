"""``table RUN_DIR ... --out DIR``: slices of one grid merged into the table one run writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from bench.cli import main
from bench.orchestration.rundir import MARKER

GRID = {
    "name": "tiny-slices",
    "datasets": [{"name": "mnist5k", "train_subset": 1000, "test_subset": 300}],
    "models": [{"name": "small_cnn", "width": 4}],
    "attacks": ["badnets", {"name": "blended", "alpha": 0.2}],
    "defenses": ["none", {"name": "shrinkpad", "pad": [2, 4]}],
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.05, "milestones": [], "flip": False},
    "tsne": {"per_class": 4, "poisoned_per_class": 2},
}
SLICINGS = {  # two slices of GRID each way: --only keeps the file's entries, --set replaces them
    "attacks": [["--only", "attacks=badnets"], ["--only", "attacks=blended"]],
    "defenses": [["--only", "defenses=none"], ["--set", "defenses=[{name: shrinkpad, pad: [2, 4]}]"]],
}


def _run(tmp: Path, out: str, *options: str, tsne: bool = True) -> Path:
    argv = ["run", str(tmp / "grid.yaml"), "--out", str(tmp / out), "--cache-dir", str(tmp / "cache"), "--workers", "1"]
    assert main(argv + list(options) + ([] if tsne else ["--no-tsne"])) == 0
    return tmp / out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The whole grid in one run, and the same grid in two slices per slicing (one shared cache)."""
    tmp = tmp_path_factory.mktemp("merge")
    (tmp / "grid.yaml").write_text(yaml.safe_dump(GRID, sort_keys=False))
    dirs = {"whole": _run(tmp, "whole", tsne=False), "tmp": tmp}
    for axis, (first, second) in SLICINGS.items():
        dirs[f"{axis}-1"] = _run(tmp, f"{axis}-1", *first)
        dirs[f"{axis}-2"] = _run(tmp, f"{axis}-2", *second)
    return dirs


def _merge(*dirs: Path, out: Path, extra: tuple[str, ...] = ()) -> int:
    return main(["table", *map(str, dirs), "--out", str(out), *extra])


@pytest.mark.parametrize("axis", sorted(SLICINGS))
def test_two_slices_merge_into_the_tables_of_one_run(runs, axis, capsys):
    out = runs["tmp"] / f"merged-{axis}"
    assert _merge(runs[f"{axis}-1"], runs[f"{axis}-2"], out=out) == 0
    assert "6 cells from 2 run directories" in capsys.readouterr().out
    for name in ("table.md", "cells.csv", "table.csv", "table.tex"):
        assert (out / name).read_text() == (runs["whole"] / name).read_text(), name
    merged = yaml.safe_load((out / "config.yaml").read_text())
    whole = yaml.safe_load((runs["whole"] / "config.yaml").read_text())
    assert merged == whole  # the combined grid, in the whole run's order
    assert json.loads((out / MARKER).read_text())["merged_from"] == [str(runs[f"{axis}-1"]), str(runs[f"{axis}-2"])]
    assert not list(out.glob("*.pt")) and not (out / "cache").exists()


def test_the_merged_report_shows_every_slices_figures(runs):
    out = runs["tmp"] / "merged-figures"
    assert _merge(runs["attacks-1"], runs["attacks-2"], out=out, extra=("--no-tsne",)) == 0
    slice_figures = {p.name for key in ("attacks-1", "attacks-2") for p in (runs[key] / "figures").glob("*.png")}
    tsne = sorted(name for name in slice_figures if name.startswith("tsne-"))
    assert any("badnets" in name for name in tsne) and any("blended" in name for name in tsne)
    page = (out / "report.html").read_text()
    for name in slice_figures:  # t-SNE copied from the slices, trade-off curves redrawn from all records
        assert (out / "figures" / name).is_file() and f"figures/{name}" in page, name
    # the t-SNE figure copied from a slice is unchanged (up to date, not redrawn)
    source = next(runs["attacks-1"].glob("figures/tsne-*.png"))
    assert (out / "figures" / source.name).read_bytes() == source.read_bytes()


def test_slices_with_another_training_setting_are_refused(runs, capsys):
    other = _run(runs["tmp"], "other-epochs", "--only", "attacks=blended", "--set", "train.epochs=2", tsne=False)
    capsys.readouterr()
    out = runs["tmp"] / "refused-epochs"
    assert _merge(runs["attacks-1"], other, out=out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot merge:") and "train.epochs = 2" in err and "\n" not in err
    assert not out.exists()


def test_a_cell_with_different_numbers_in_two_slices_is_refused(runs, capsys):
    twin = runs["tmp"] / "twin"
    shutil.copytree(runs["attacks-1"], twin)
    record_path = sorted((twin / "records").glob("*.json"))[0]
    record = json.loads(record_path.read_text())
    record["ba"] += 1.0
    record_path.write_text(json.dumps(record))
    out = runs["tmp"] / "refused-twin"
    assert _merge(runs["attacks-1"], twin, out=out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot merge: cell " + record["cell_id"]) and err.count("\n") == 1
    assert not out.exists()
    # the same cell with the same numbers is merged once
    shutil.copy2(runs["attacks-1"] / "records" / record_path.name, record_path)
    assert _merge(runs["attacks-1"], twin, out=out, extra=("--no-tsne",)) == 0
    assert len(list((out / "records").glob("*.json"))) == 3


def test_out_must_be_new_empty_or_an_earlier_merge(runs, capsys, tmp_path):
    slices = (runs["attacks-1"], runs["attacks-2"])
    assert _merge(*slices, out=runs["attacks-1"]) == 2
    assert "is one of the run directories being merged" in capsys.readouterr().err
    assert _merge(*slices, out=runs["whole"]) == 2
    assert "a run directory written by 'run', not an earlier merge" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert _merge(*slices, out=tmp_path / "mine") == 2
    assert "a non-empty directory, not an earlier merge" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    # an earlier merge is replaced by the new one: one slice now, its records only
    out = tmp_path / "merged"
    assert _merge(*slices, out=out, extra=("--no-tsne",)) == 0
    assert _merge(runs["attacks-1"], out=out, extra=("--no-tsne",)) == 0
    assert len(list((out / "records").glob("*.json"))) == 3
    assert "blended" not in (out / "table.md").read_text()


def test_several_run_directories_without_out_are_refused(runs, capsys):
    assert main(["table", str(runs["attacks-1"]), str(runs["attacks-2"])]) == 2
    assert "give --out DIR" in capsys.readouterr().err


def test_only_keeps_the_grid_files_entries_with_their_parameters(runs):
    record = json.loads(next((runs["attacks-2"] / "records").glob("*.json")).read_text())
    assert record["config"]["attacks"] == [{"name": "blended", "params": {"alpha": 0.2}, "label": None}]
    assert {r["attack_params"]["alpha"] for r in map(json.loads, map(Path.read_text,
            (runs["attacks-2"] / "records").glob("*.json")))} == {0.2}  # fmt: skip


@pytest.mark.parametrize(("only", "message"), [
    ("attacks=wanet", "--only attacks: no entry is called 'wanet'; the grid's attacks: badnets, blended"),
    ("poison=0.1", "--only expects KEY=NAME[,NAME...] with KEY one of"),
    ("attacks=", "--only expects KEY=NAME[,NAME...]"),
])  # fmt: skip
def test_only_refuses_what_selects_nothing(runs, capsys, only, message):
    argv = ["run", str(runs["tmp"] / "grid.yaml"), "--only", only, "--out", str(runs["tmp"] / "never"),
            "--cache-dir", str(runs["tmp"] / "cache")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (runs["tmp"] / "never").exists()
