"""The ImageNet-subset path at 224 px, on a tiny synthetic ImageNet made on the fly.

A fake ImageNet download (class folders of odd-sized PNGs) goes through ``bench.core.imagenet_subset``
to a 224-px image folder, and that folder through ``run_bench.py run`` with the settings of
``configs/imagenet50_paper.yaml`` at minimal sizes: torchvision's ResNet-18, BadNets with its
20x20 patch, ShrinkPad, and REFINE with the U-Net width it picks for 224-px images (c = 32).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bench.core.imagenet_subset import main as make_subset
from bench.orchestration.store import ArtifactStore
from tests.conftest import REPO

CLASSES = ("n01000001", "n01000002", "n01000003", "n01000004")
SIZES = ((260, 300), (300, 240), (224, 224), (250, 400))


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ class trees of non-square PNGs, each class its own colour plus noise."""
    root = tmp_path_factory.mktemp("fake-imagenet")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 10), ("val", 4)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                w, h = SIZES[(i + c) % len(SIZES)]
                colour = np.array([60 * c, 255 - 60 * c, 128], dtype=np.int16)
                pixels = np.clip(colour + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.PNG")
    return root


def test_the_helper_builds_a_224_px_folder_of_the_chosen_classes(fake_imagenet: Path, tmp_path: Path) -> None:
    chosen = tmp_path / "classes.txt"
    chosen.write_text(f"# three of the four\n{CLASSES[2]}\n{CLASSES[0]}\n{CLASSES[3]}\n")
    dest = tmp_path / "subset"
    assert make_subset([str(fake_imagenet / "train"), str(fake_imagenet / "val"), str(dest), "--classes", str(chosen)]) == 0
    assert (dest / "classes.txt").read_text().split() == [CLASSES[0], CLASSES[2], CLASSES[3]]
    for split, per_class in (("train", 10), ("test", 4)):
        assert sorted(p.name for p in (dest / split).iterdir()) == [CLASSES[0], CLASSES[2], CLASSES[3]]
        files = sorted((dest / split).glob("*/*.jpeg"))
        assert len(files) == 3 * per_class
        for f in files:
            with Image.open(f) as img:
                assert img.size == (224, 224) and img.mode == "RGB"
    # Every 2nd of the four classes, two of them: the stride rule without a list.
    strided = tmp_path / "strided"
    argv = [str(fake_imagenet / "train"), str(fake_imagenet / "val"), str(strided), "--stride", "2", "--count", "2"]
    assert make_subset(argv) == 0
    assert (strided / "classes.txt").read_text().split() == [CLASSES[0], CLASSES[2]]


def test_bad_helper_input_is_one_line_and_writes_nothing(fake_imagenet: Path, tmp_path: Path, capsys) -> None:
    unknown = tmp_path / "classes.txt"
    unknown.write_text("n09999999\n")
    dest = tmp_path / "subset"
    train, val = str(fake_imagenet / "train"), str(fake_imagenet / "val")
    assert make_subset([train, val, str(dest), "--classes", str(unknown)]) == 2
    assert capsys.readouterr().err == f"error: {unknown}: 1 class(es) not in the training tree, e.g. 'n09999999'\n"
    assert make_subset([train, val, str(dest), "--count", "3", "--stride", "2"]) == 2
    assert "fewer than 3" in capsys.readouterr().err
    assert not dest.exists() and not (tmp_path / "subset.partial").exists()


def test_the_imagenet_grid_runs_end_to_end_at_224_px(fake_imagenet: Path, tmp_path: Path) -> None:
    data = tmp_path / "imagenet-subset"
    argv = [str(fake_imagenet / "train"), str(fake_imagenet / "val"), str(data), "--stride", "2", "--count", "2"]
    assert make_subset(argv) == 0
    shipped = yaml.safe_load((REPO / "configs" / "imagenet50_paper.yaml").read_text())
    badnets = next(a for a in shipped["attacks"] if isinstance(a, dict) and a["name"] == "badnets")
    grid = {
        "name": "imagenet_tiny",
        "datasets": shipped["datasets"],
        "models": shipped["models"],
        "attacks": [badnets],
        "defenses": ["none", {"name": "shrinkpad", "pad": 4},
                     {"name": "refine", "epochs": 1, "batch_size": 2, "milestones": [1], "benign_fraction": 0.2}],  # fmt: skip
        "seeds": [0],
        "poison": {"rate": 0.2, "target": 0},
        "holdout": 0.2,
        "eval_batch_size": 8,
        "tsne": {"per_class": 0},
        "train": {"epochs": 1, "batch_size": 4, "milestones": [], "lr": 0.01},
    }
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid, sort_keys=False))
    run, cache = tmp_path / "run", tmp_path / "cache"
    done = subprocess.run(
        [sys.executable, "run_bench.py", "run", str(config), "--data-root", str(data), "--out", str(run),
         "--cache-dir", str(cache), "--device", "cpu", "--workers", "1", "--no-tsne"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = {r["defense"]: r for r in (json.loads(p.read_text()) for p in (run / "records").glob("*.json"))}
    assert set(records) == {"none", "shrinkpad", "refine"}
    for record in records.values():
        assert record["dataset_label"] == "imagenet50" and record["model"] == "resnet18"
        assert record["image_shape"] == [3, 224, 224]
        assert record["attack"] == "badnets" and record["attack_params"]["size"] == 20
        assert record["n_test_clean"] == 8 and record["n_test_poisoned"] == 4  # the target class's 4 removed
        for metric in ("ba", "asr"):
            assert 0 <= record[metric] <= 100, (record["defense"], metric, record[metric])
    refine = records["refine"]
    state = ArtifactStore(cache).load("defenses", refine["defense_key"])
    assert state is not None, "REFINE's fitted state is not in the cache"
    # REFINE chose the paper's ImageNet U-Net width (c = 32) for 224-px images by itself.
    assert refine["defense_params"]["width"] is None
    assert state["unet"]["stem.0.weight"].shape[0] == 32 and state["unet"]["stem.0.weight"].dtype == torch.float32
