"""t-SNE figures from the features cells save: the sample, the capture, the files, the figures.

The real tiny run below computes every cell once (with the features captured) and once more
without the capture, then deletes the artifact cache: every figure test draws from the run
directory alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import bench.core.models
import bench.report.tsne
from bench.core.data import DataPaths
from bench.core.device import to_float
from bench.core.errors import BenchError
from bench.core.metrics import backdoor_metrics, evaluate_with_features
from bench.core.models import build_model
from bench.core.records import RecordStore
from bench.core.tsne_sample import CellFeatures, load_features, per_class_index, sample_indices, save_features
from bench.orchestration.config import validate
from bench.orchestration.execute import run_grid
from bench.report.tsne import choose_panels, embed, figure_plan, poison_to_target, write_tsne_figures
from defenses.shrinkpad import ShrinkPad

CPU = torch.device("cpu")
PER_CLASS, POISONED_PER_CLASS = 6, 3
N_BENIGN, N_POISONED = PER_CLASS * 10, POISONED_PER_CLASS * 9  # MNIST: ten classes, target 0 left out
BADNETS_STEM = "tsne-mnist5k-test-subset-500-train-subset-2000-small-cnn-width-8-badnets"


def tiny_config(defenses: list, **extra) -> dict:
    return {
        "name": "tiny-tsne", "datasets": [{"name": "mnist5k", "train_subset": 2000, "test_subset": 500}],
        "models": [{"name": "small_cnn", "width": 8}],
        "attacks": ["badnets", {"name": "blended", "alpha": 0.1}], "defenses": defenses, "seeds": [0],
        "train": {"epochs": 1, "batch_size": 128, "lr": 0.05, "milestones": [], "crop_padding": 2, "flip": False},
        "tsne": {"per_class": PER_CLASS, "poisoned_per_class": POISONED_PER_CLASS}, **extra,
    }  # fmt: skip


DEFENSES = ["none", {"name": "shrinkpad", "pad": [0, 2, 6]}]


# ----------------------------------------------------------------------------- the sample and its file


def test_per_class_sample_is_balanced_and_seeded() -> None:
    y = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    pick = per_class_index(y, 5, torch.Generator().manual_seed(1))
    assert torch.bincount(y[pick]).tolist() == [5, 3, 5]
    assert torch.equal(pick, per_class_index(y, 5, torch.Generator().manual_seed(1)))
    assert not torch.equal(pick, per_class_index(y, 5, torch.Generator().manual_seed(2)))
    benign, poisoned = sample_indices(y, y[y != 0], 2, 1, seed=4)
    assert torch.equal(benign, sample_indices(y, y[y != 0], 2, 1, seed=4)[0])
    assert torch.bincount(y[benign]).tolist() == [2, 2, 2] and len(poisoned) == 2


def features_example(reference: bool = False) -> CellFeatures:
    rng = np.random.default_rng(0)
    extra = {"reference_benign": rng.normal(size=(4, 3)), "reference_poisoned": rng.normal(size=(2, 3))} if reference else {}
    return CellFeatures(benign=rng.normal(size=(4, 3)), poisoned=rng.normal(size=(2, 3)),
                        benign_labels=np.array([0, 0, 1, 1]), poisoned_labels=np.array([1, 1]),
                        classes=["zero", "one"], target=0, per_class=2, poisoned_per_class=2, **extra)  # fmt: skip


def test_features_file_round_trips_as_float16_and_rejects_damage(tmp_path: Path) -> None:
    original = features_example(reference=True)
    save_features(original, tmp_path / "f.npz")
    loaded = load_features(tmp_path / "f.npz")
    assert loaded is not None and loaded.benign.dtype == np.float16
    np.testing.assert_allclose(loaded.benign, original.benign, atol=1e-2)
    np.testing.assert_allclose(loaded.reference_poisoned, original.reference_poisoned, atol=1e-2)
    assert loaded.classes == ["zero", "one"] and (loaded.target, loaded.per_class) == (0, 2)
    assert loaded.same_sample(original)
    save_features(features_example(), tmp_path / "plain.npz")
    assert load_features(tmp_path / "plain.npz").reference_benign is None
    assert load_features(tmp_path / "missing.npz") is None
    (tmp_path / "cut.npz").write_bytes((tmp_path / "f.npz").read_bytes()[:100])
    assert load_features(tmp_path / "cut.npz") is None
    # An archive that needs unpickling is refused, never unpickled.
    np.savez(tmp_path / "pickled.npz", benign=np.array([{"x": 1}], dtype=object))
    assert load_features(tmp_path / "pickled.npz") is None


def test_poison_to_target_measures_the_nearest_centroid() -> None:
    benign = np.array([[0.0, 0.0], [0.2, 0.0], [10.0, 0.0], [10.2, 0.0]])
    labels = np.array([0, 0, 1, 1])
    assert poison_to_target(benign, labels, np.array([[1.0, 0.0], [9.0, 0.0], [2.0, 1.0], [3.0, 0.0]]), 0) == 75.0
    assert poison_to_target(benign, labels, np.array([[1.0, 0.0]]), 1) == 0.0


def test_embed_of_features_a_defense_made_constant_is_one_point() -> None:
    """A U-Net whose output is constant gives every image the same features: one point, no
    NaN from the zero variance (scikit-learn's Barnes-Hut t-SNE crashed the process on them)."""
    points = np.tile(np.linspace(-1, 1, 64, dtype=np.float32), (80, 1))
    out = embed(points, seed=0)
    assert out.shape == (80, 2) and np.isfinite(out).all() and np.ptp(out, axis=0).max() == 0
    with pytest.raises(BenchError, match="NaN or infinity"):
        embed(np.where(np.eye(80, 64) > 0, np.nan, points), seed=0)


def test_embed_is_deterministic_2d() -> None:
    points = np.random.default_rng(0).normal(size=(60, 80))
    a, b = embed(points, 3), embed(points, 3)
    assert a.shape == (60, 2) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b)


# ----------------------------------------------------------------------------- capture during evaluation


def test_predict_with_features_is_predict_plus_the_penultimate_features() -> None:
    """Same logits and same random draws as predict (ShrinkPad draws an offset per image)."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, width=4).eval()
    x = torch.rand(12, 1, 28, 28)
    plain, capturing, reference = ShrinkPad(pad=4), ShrinkPad(pad=4), ShrinkPad(pad=4)
    for defense in (plain, capturing, reference):
        defense.bind(model, CPU, seed=3)
    with torch.no_grad():
        logits, features = capturing.predict_with_features(x)
        assert torch.equal(logits, plain.predict(x))
        assert torch.equal(features, reference.features(x))
        assert not torch.equal(features, model.features(x))  # the check can fail: ShrinkPad moved the images
        assert torch.equal(capturing.predict(x), plain.predict(x))  # the generators are still in step


def test_evaluation_with_capture_gives_the_same_metrics_and_keeps_the_sample_rows(mnist) -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, width=4).eval()
    clean_x, clean_y = mnist.test.x[:300], mnist.test.y[:300]
    poisoned_x, poisoned_y = clean_x[clean_y != 0], clean_y[clean_y != 0]
    plain, capturing = ShrinkPad(pad=2), ShrinkPad(pad=2)
    for defense in (plain, capturing):
        defense.bind(model, CPU, seed=1)
    keep_clean, keep_poisoned = torch.tensor([0, 5, 99, 299]), torch.tensor([1, 150])
    metrics = backdoor_metrics(plain.predict, clean_x, clean_y, poisoned_x, poisoned_y, 0, CPU, batch_size=64)
    result = evaluate_with_features(capturing.predict_with_features, clean_x, clean_y, poisoned_x, poisoned_y, 0, CPU,
                                    64, keep_clean, keep_poisoned)  # fmt: skip
    assert result.metrics == metrics
    assert result.clean_features.shape == (4, 16) and result.poisoned_features.shape == (2, 16)
    # Row 99 came from the second batch: re-derive it with a defense whose generator is in the same state.
    again = ShrinkPad(pad=2)
    again.bind(model, CPU, seed=1)
    with torch.no_grad():
        again.predict(to_float(clean_x[:64]))
        second = again.features(to_float(clean_x[64:128]))
    torch.testing.assert_close(result.clean_features[2], second[99 - 64])


# ----------------------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def tsne_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The grid run with the capture, the same cells without it, and then no artifact cache."""
    root = tmp_path_factory.mktemp("tsne")
    paths = DataPaths(root / "data", root / "cache")
    config = validate(tiny_config(DEFENSES), "test")
    cells, computed, _ = run_grid(config, root / "run", paths, "cpu")
    assert computed == len(cells) == 8
    plain = validate(tiny_config(DEFENSES, tsne={"per_class": 0}), "test")
    run_grid(plain, root / "plain", paths, "cpu")
    no_reference = validate(tiny_config([{"name": "shrinkpad", "pad": [0, 6]}]), "test")
    run_grid(no_reference, root / "no-none", paths, "cpu")
    shutil.rmtree(root / "cache")  # from here on nothing can load a model or a fitted defense
    return {"root": root, "run": root / "run", "cells": cells}


def records(run_dir: Path) -> dict[str, dict]:
    return {r["cell_id"]: r for r in RecordStore(run_dir).read_all()}


def test_every_cell_saves_the_same_sample_of_features(tsne_run: dict) -> None:
    store = RecordStore(tsne_run["run"])
    saved = {cell_id: store.read_features(cell_id) for cell_id in records(tsne_run["run"])}
    assert len(saved) == 8 and all(f is not None for f in saved.values())
    by_attack: dict[str, dict[str, CellFeatures]] = {}
    for cell_id, features in saved.items():
        assert features.benign.shape == (N_BENIGN, 32) and features.poisoned.shape == (N_POISONED, 32)
        assert features.benign.dtype == np.float16 and np.isfinite(features.benign).all()
        assert np.bincount(features.benign_labels).tolist() == [PER_CLASS] * 10
        assert 0 not in features.poisoned_labels  # no target-class image in the poisoned sample
        assert features.reference_benign is None  # the grid has a none defense
        record = records(tsne_run["run"])[cell_id]
        by_attack.setdefault(record["attack_label"], {})[record["defense_label"]] = features
    for group in by_attack.values():
        assert all(f.same_sample(group["none"]) for f in group.values())
        # the defense moved the features (ShrinkPad's pad 0 is the identity: not that one)
        assert not np.array_equal(group["none"].benign, group["shrinkpad(pad=6)"].benign)


def test_capture_leaves_ba_and_asr_unchanged(tsne_run: dict) -> None:
    captured, plain = records(tsne_run["run"]), records(tsne_run["root"] / "plain")
    assert captured.keys() == plain.keys()
    for cell_id, record in captured.items():
        assert {m: record[m] for m in ("ba", "asr", "ra")} == {m: plain[cell_id][m] for m in ("ba", "asr", "ra")}
    assert not (tsne_run["root"] / "plain" / "features").exists()  # per_class 0: no capture


def test_figures_are_drawn_from_saved_features_without_the_cache(tsne_run: dict, monkeypatch) -> None:
    run = tsne_run["run"]
    assert not (tsne_run["root"] / "cache").exists()
    monkeypatch.setattr(bench.core.models, "build_model", lambda *a, **k: pytest.fail("t-SNE built a model"))
    pngs = write_tsne_figures(run)
    assert [p.name for p in pngs] == [f"{BADNETS_STEM}.png", BADNETS_STEM.replace("badnets", "blended-alpha-0-1.png")]
    for png in pngs:
        assert png.read_bytes()[:4] == b"\x89PNG" and png.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"
    points = pd.read_csv(pngs[0].with_suffix(".csv"))
    assert list(dict.fromkeys(points["panel"])) == ["none", "shrinkpad(pad=2)", "shrinkpad(pad=6)"]
    panel = points[points["panel"] == "none"]
    assert panel["poisoned"].sum() == N_POISONED and (~panel["poisoned"]).sum() == N_BENIGN
    assert 0 not in set(panel.loc[panel["poisoned"], "label"])
    assert np.isfinite(points[["x", "y"]].to_numpy()).all()


def test_choose_panels_defaults_and_explicit_labels(tsne_run: dict) -> None:
    badnets = [r for r in records(tsne_run["run"]).values() if r["attack"] == "badnets"]
    assert [p.label for p in choose_panels(badnets)] == ["none", "shrinkpad(pad=2)", "shrinkpad(pad=6)"]
    picked = choose_panels(badnets, ["shrinkpad(pad=0)", "none"])
    assert [p.label for p in picked] == ["shrinkpad(pad=0)", "none"] and all(p.record for p in picked)
    with pytest.raises(BenchError, match="no finished cell with defense label"):
        choose_panels(badnets, ["refine"])
    unfinished = [r for r in badnets if r["intensity"] != 6]  # as if the pad-6 cell had failed
    assert [p.label for p in choose_panels(unfinished)] == ["none", "shrinkpad(pad=2)"]
    with pytest.raises(BenchError, match="no finished cell of an attack"):
        figure_plan(tsne_run["run"], badnets, attacks=["wanet"])


def test_a_grid_without_none_shows_the_undefended_features_saved_by_its_first_defense(tsne_run: dict) -> None:
    run = tsne_run["root"] / "no-none"
    badnets = [r for r in records(run).values() if r["attack"] == "badnets"]
    panels = choose_panels(badnets)
    assert [p.label for p in panels] == ["none", "shrinkpad(pad=6)"] and panels[0].record is None
    first = RecordStore(run).read_features(panels[0].source)
    assert first is not None and first.reference_benign is not None
    # The undefended features are the none cell's features of the other run (same model, same images).
    (none_id,) = [i for i, r in records(tsne_run["run"]).items() if r["attack"] == "badnets" and r["defense"] == "none"]
    none = RecordStore(tsne_run["run"]).read_features(none_id)
    np.testing.assert_allclose(first.reference_benign.astype(float), none.benign.astype(float), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(first.reference_poisoned.astype(float), none.poisoned.astype(float), rtol=1e-2, atol=1e-2)
    (pad6,) = [RecordStore(run).read_features(r["cell_id"]) for r in badnets if r["cell_id"] != panels[0].source]
    assert pad6.reference_benign is None  # saved once, by the first defense's cell
    assert not np.allclose(pad6.benign.astype(float), none.benign.astype(float), rtol=1e-2, atol=1e-2)  # can fail
    (png,) = write_tsne_figures(run, attacks=["badnets"])
    assert list(dict.fromkeys(pd.read_csv(png.with_suffix(".csv"))["panel"])) == ["none", "shrinkpad(pad=6)"]


def test_missing_features_leave_the_panel_out_with_a_warning(tsne_run: dict, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(tsne_run["run"], run)
    (pad6,) = [i for i, r in records(run).items() if r["attack"] == "badnets" and r["intensity"] == 6]
    RecordStore(run).features_path(pad6).unlink()  # as if the cell had been computed by an older version
    (png,) = write_tsne_figures(run, attacks=["badnets"])
    assert list(dict.fromkeys(pd.read_csv(png.with_suffix(".csv"))["panel"])) == ["none", "shrinkpad(pad=2)"]
    assert "no saved features for ['shrinkpad(pad=6)']" in capsys.readouterr().err


def test_a_run_killed_while_drawing_figures_draws_the_missing_ones_on_rerun(tsne_run: dict, tmp_path: Path,
                                                                               monkeypatch) -> None:  # fmt: skip
    run = tmp_path / "run"
    shutil.copytree(tsne_run["run"], run, ignore=shutil.ignore_patterns("figures"))
    config = validate(tiny_config(DEFENSES), "test")
    paths = DataPaths(tmp_path / "data", tmp_path / "no-cache")
    real_write = bench.report.tsne.atomic_write_text

    def killed_before_the_csv(*args, **kwargs):
        raise KeyboardInterrupt  # the first figure's PNG and PDF are written, its CSV is not

    monkeypatch.setattr(bench.report.tsne, "atomic_write_text", killed_before_the_csv)
    with pytest.raises(KeyboardInterrupt):
        run_grid(config, run, paths, "cpu", tsne=True)
    figures = run / "figures"
    assert (figures / f"{BADNETS_STEM}.png").exists() and not (figures / f"{BADNETS_STEM}.csv").exists()
    assert not list(figures.glob("tsne-*blended*"))

    monkeypatch.setattr(bench.report.tsne, "atomic_write_text", real_write)
    embedded = []
    real_embed = bench.report.tsne.embed
    monkeypatch.setattr(bench.report.tsne, "embed", lambda points, seed: embedded.append(1) or real_embed(points, seed))
    _, computed, _ = run_grid(config, run, paths, "cpu", tsne=True)
    assert computed == 0 and len(embedded) == 6  # both figures, three panels each
    stems = [BADNETS_STEM, BADNETS_STEM.replace("badnets", "blended-alpha-0-1")]
    assert all((figures / f"{stem}{suffix}").is_file() for stem in stems for suffix in (".png", ".pdf", ".csv"))
    mtimes = {p: p.stat().st_mtime_ns for p in figures.glob("tsne-*")}

    embedded.clear()
    run_grid(config, run, paths, "cpu", tsne=True)
    assert not embedded and {p: p.stat().st_mtime_ns for p in figures.glob("tsne-*")} == mtimes

    # A recomputed cell (newer record and features) makes its figure out of date, and only that one.
    (pad2,) = [i for i, r in records(run).items() if r["attack"] == "badnets" and r["intensity"] == 2]
    store = RecordStore(run)
    store.write(json.loads(store.path(pad2).read_text()), store.read_features(pad2))
    run_grid(config, run, paths, "cpu", tsne=True)
    assert len(embedded) == 3
    assert (figures / f"{stems[1]}.png").stat().st_mtime_ns == mtimes[figures / f"{stems[1]}.png"]
