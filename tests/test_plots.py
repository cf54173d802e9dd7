"""Trade-off curves: numbers from records, and a real tiny run (t-SNE figures: test_tsne.py)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd
import pytest

import bench.orchestration.runner
from bench.core.data import DataPaths
from bench.core.records import RecordStore
from bench.orchestration.config import validate
from bench.orchestration.execute import run_grid
from bench.report.plots import tradeoff_groups, write_tradeoff_figures
from bench.report.tables import records_frame

PADS = [0, 2, 4, 6, 8, 10, 12]


def record(attack: str, defense: str, intensity: int | None, seed: int, ba: float, asr: float, fi: int) -> dict:
    return {
        "cell_id": f"{attack}-{defense}-{intensity}-{seed}", "dataset": "mnist5k", "model": "small_cnn",
        "attack": attack, "attack_label": attack, "defense": defense,
        "defense_label": defense if intensity is None else f"{defense}(pad={intensity})",
        "defense_params": {} if intensity is None else {"pad": intensity, "benign_fraction": None},
        "intensity": intensity, "seed": seed, "ba": ba, "asr": asr, "ra": 0.0, "order": [0, 0, 0, fi, seed],
    }  # fmt: skip


def sweep_records() -> list[dict]:
    rows = [record("badnets", "none", None, s, 98.0 + s, 100.0 - s, 0) for s in (0, 1)]
    for i, pad in enumerate(PADS):
        for seed in (0, 1):
            rows.append(record("badnets", "shrinkpad", pad, seed, 98.0 - 3 * pad - seed, 100.0 - 8 * pad + seed, i + 1))
    return rows


def test_tradeoff_groups_average_seeds_and_find_the_reference() -> None:
    rows = sweep_records()
    (group,) = tradeoff_groups(records_frame(rows))
    assert (group["defense"], group["knob"], group["attack"], group["fixed"]) == ("shrinkpad", "pad", "badnets", "")
    curve = group["curve"]
    assert list(curve["intensity"]) == PADS
    for _, point in curve.iterrows():
        cells = [r for r in rows if r["intensity"] == point["intensity"]]
        assert point["ba_mean"] == pytest.approx(statistics.mean(r["ba"] for r in cells))
        assert point["asr_std"] == pytest.approx(statistics.stdev(r["asr"] for r in cells))
    assert group["reference"] == pytest.approx({"ba": 98.5, "asr": 99.5})
    assert group["n_seeds"] == 2


def test_a_single_intensity_is_no_curve_and_differing_settings_are_two() -> None:
    single = [r for r in sweep_records() if r["intensity"] in (None, 4)]
    assert tradeoff_groups(records_frame(single)) == []
    rows = sweep_records()
    for r in rows[: len(rows) // 2 + 1]:
        if r["defense"] == "shrinkpad":
            r["defense_params"] = {**r["defense_params"], "benign_fraction": 0.05}
            r["cell_id"] += "-b"
    names = sorted(g["fixed"] for g in tradeoff_groups(records_frame(rows)))
    assert names == ["benign_fraction=0.05", "benign_fraction=None"]


def test_tradeoff_figures_are_written_as_png_and_pdf(tmp_path: Path) -> None:
    rows = sweep_records() + [r | {"attack": "blended", "attack_label": "blended", "cell_id": r["cell_id"] + "b"}
                              for r in sweep_records()]  # fmt: skip
    pngs = write_tradeoff_figures(tmp_path, rows)
    assert sorted(p.name for p in pngs) == [
        "tradeoff-mnist5k-small-cnn-shrinkpad-badnets.png", "tradeoff-mnist5k-small-cnn-shrinkpad-blended.png"]  # fmt: skip
    for png in pngs:
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert png.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"


def tiny_config(defenses: list) -> dict:
    return {
        "name": "tiny-tradeoff", "datasets": [{"name": "mnist5k", "train_subset": 2000, "test_subset": 500}],
        "models": [{"name": "small_cnn", "width": 8}],
        "attacks": ["badnets"], "defenses": defenses, "seeds": [0],
        "train": {"epochs": 1, "batch_size": 128, "lr": 0.05, "milestones": [], "crop_padding": 2, "flip": False},
    }  # fmt: skip


# ----------------------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def tradeoff_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 7-intensity ShrinkPad sweep on real MNIST, counting how often a model is trained."""
    root = tmp_path_factory.mktemp("tradeoff")
    paths = DataPaths(root / "data", root / "cache")
    config = validate(tiny_config(["none", {"name": "shrinkpad", "pad": PADS}]), "test")
    calls = []
    real_train = bench.orchestration.runner.train_classifier

    def counting_train(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real_train(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench.orchestration.runner, "train_classifier", counting_train)
        cells, computed, markdown = run_grid(config, root / "run", paths, "cpu", workers=1)  # in this process: counted
        again = run_grid(config, root / "run", paths, "cpu", workers=1)[1]
    return {"root": root, "paths": paths, "cells": cells, "computed": computed, "again": again, "calls": calls,
            "markdown": markdown}  # fmt: skip


def test_seven_intensities_train_the_backdoored_model_once(tradeoff_run: dict) -> None:
    assert tradeoff_run["computed"] == 1 + len(PADS) and tradeoff_run["again"] == 0
    assert len(tradeoff_run["calls"]) == 1
    assert len(list((tradeoff_run["root"] / "cache" / "models").glob("*.pt"))) == 1
    records = list(RecordStore(tradeoff_run["root"] / "run").read_all())
    assert len(records) == 1 + len(PADS) and len({r["model_key"] for r in records}) == 1
    assert sorted(r["intensity"] for r in records if r["defense"] == "shrinkpad") == PADS


def test_the_run_writes_tradeoff_figure_and_report(tradeoff_run: dict) -> None:
    run = tradeoff_run["root"] / "run"
    stem = run / "figures" / "tradeoff-mnist5k-small-cnn-shrinkpad-badnets"
    assert stem.with_suffix(".png").exists() and stem.with_suffix(".pdf").exists()
    page = (run / "report.html").read_text()
    assert "figures/tradeoff-mnist5k-small-cnn-shrinkpad-badnets.png" in page and "tiny-tradeoff" in page
    assert not list((run / "figures").glob("tsne-*")), "t-SNE is opt-in for run_grid"
    long = pd.read_csv(run / "cells.csv")
    assert len(long) == 1 + len(PADS)
