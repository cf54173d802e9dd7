"""Whole-grid validation: what can be known without training fails in one line, before any work.

Every case runs ``run_bench.py`` in a subprocess with one bad input and checks the contract: exit
status 2, exactly one stderr line starting ``error:``, no traceback, and nothing created -- no
run directory, no cache directory, not even the missing ``--data-root`` folder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

GRID = {
    "datasets": ["mnist5k"],
    "models": [{"name": "small_cnn", "width": 4}],
    "attacks": ["badnets"],
    "defenses": ["none"],
    "train": {"epochs": 1, "batch_size": 64, "milestones": [], "flip": False},
}


def one_class_folder(root: Path) -> Path:
    """An image-folder tree whose train/ and test/ hold a single class."""
    for split in ("train", "test"):
        (root / split / "only").mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / split / "only" / "a.png")
    return root


def run_bad(tmp_path: Path, changes: dict, *extra: str, dry_run: bool = False) -> tuple[str, dict[str, Path]]:
    """Run the CLI on GRID with ``changes``; assert the one-line exit-2 contract; return stderr."""
    places = {"run": tmp_path / "run", "cache": tmp_path / "cache", "data": tmp_path / "no-data-here"}
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({**GRID, **changes}))
    command = [sys.executable, str(REPO / "run_bench.py"), "run", str(config), "--out", str(places["run"]),
               "--data-root", str(places["data"]), "--device", "cpu", "--no-tsne"]  # fmt: skip
    if "--cache-dir" not in extra:
        command += ["--cache-dir", str(places["cache"])]
    command += [*extra, *(["--dry-run"] if dry_run else [])]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    for name, path in places.items():
        assert not path.exists(), f"the {name} directory {path} was created"
    return lines[0], places


@pytest.mark.parametrize(
    ("changes", "extra", "message"),
    [
        ({"datasets": ["cifar10"], "poison": {"target": 10}}, (),
         "poison.target 10 is not a class of dataset 'cifar10' (10 classes: 0 to 9)"),
        ({"datasets": ["cifar10"]}, ("--set", "poison.target=99"), "poison.target 99 is not a class of dataset 'cifar10'"),
        ({"models": [{"name": "small_cnn", "widht": 4}]}, (), "small_cnn: unknown parameter 'widht' (did you mean 'width'?)"),
        ({"datasets": [{"name": "mnist5k", "train_sise": 900}]}, (), "mnist5k: unknown parameter 'train_sise'"),
        ({}, ("--set", "train.weight_decay=-1"), "train.weight_decay must be >= 0, got -1"),
        ({}, ("--set", "train.lr=.nan"), "train.lr must be a finite number, got nan"),
        ({"attacks": [{"name": "badnets", "position": [26, 3]}]}, (),
         "badnets: a 3x3 patch at (26, 3) does not fit a 28x28 image"),
        ({"attacks": [{"name": "shrinkpad"}]}, (), "unknown attack 'shrinkpad'"),
        ({"defenses": [{"name": "shrinkpad", "pad": 28}]}, (), "shrinkpad: pad 28 must be smaller than the image size 28x28"),
        ({"defenses": [{"name": "refine", "benign_fraction": 0.5}]}, (),
         "refine: benign_fraction 0.5 needs 2000 clean samples but the holdout has 800"),
        ({"datasets": [{"name": "mnist5k", "test_subset": 2000}]}, (), "mnist5k: test_subset must be <= 1000"),
    ],
)
def test_impossible_grids_fail_in_one_line_and_create_nothing(tmp_path, changes, extra, message) -> None:
    line, _ = run_bad(tmp_path, changes, *extra)
    assert message in line


def test_a_missing_blended_pattern_file(tmp_path) -> None:
    missing = tmp_path / "cat.png"
    line, _ = run_bad(tmp_path, {"attacks": [{"name": "blended", "pattern": str(missing)}]})
    assert line == f"error: blended: pattern must be 'noise' or an existing image file, got '{missing}'"


def test_an_image_folder_with_one_class(tmp_path) -> None:
    root = one_class_folder(tmp_path / "tree")
    line, _ = run_bad(tmp_path, {"datasets": [{"name": "imagefolder", "root": str(root)}]})
    assert "dataset 'imagefolder' has 1 class; a backdoor benchmark needs at least 2" in line
    assert not (root / "cache").exists() and sorted(p.name for p in root.iterdir()) == ["test", "train"]


def test_a_cache_dir_that_is_a_file(tmp_path) -> None:
    cache_file = tmp_path / "cache.txt"
    cache_file.write_text("not a directory")
    line, _ = run_bad(tmp_path, {}, "--cache-dir", str(cache_file))
    assert f"cache directory {cache_file} exists and is not a directory" in line
    assert cache_file.read_text() == "not a directory"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"datasets": [{"name": "mnist5k", "trian_size": 900}]}, "mnist5k: unknown parameter 'trian_size'"),
        ({"models": [{"name": "small_cnn", "depth": 3}]}, "small_cnn: unknown parameter 'depth'"),
        ({"datasets": ["cifar10"], "poison": {"target": 10}}, "poison.target 10 is not a class"),
    ],
)
def test_dry_run_validates_the_whole_grid_too(tmp_path, changes, message) -> None:
    line, _ = run_bad(tmp_path, changes, dry_run=True)
    assert message in line
