"""The paper's composed figures from a run directory: Figure 2 (trade-off beside t-SNE panels),
Figure 3 (BTI-DBF's inverted and purified images, saved at evaluation time) and REFINE's
benign-data sweep.

One tiny real MNIST run computes every cell once; the artifact cache is then deleted, so every
figure below is drawn from the run directory alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import bench.report.tsne
from bench.cli import main
from bench.core.data import DataPaths
from bench.core.errors import BenchError
from bench.core.illustrations import CellIllustrations, load_illustrations, save_illustrations
from bench.core.records import RecordStore
from bench.orchestration.config import validate
from bench.orchestration.execute import run_grid
from bench.orchestration.grid import compile_grid
from bench.report.figure2 import figure_plan, pick_intensities, write_figure2
from bench.report.inversion import figure_plan as inversion_figure_plan
from bench.report.inversion import figure_rows, write_inversion_figures
from tests.gridrun import one_thread

BTIDBF_TINY = {"generator_base": 4, "generator_depth": 2, "generator_norm": "batch", "batch_size": 64,
               "pretrain_epochs": 1, "mask_epochs": 1, "invert_epochs": 1, "rounds": 1, "defend_epochs": 1,
               "crop_padding": 2, "flip": False}  # fmt: skip
COUNT = 5  # illustration images per cell


def tiny_config(defenses: list, **extra) -> dict:
    return {
        "name": "tiny-figures", "datasets": [{"name": "mnist5k", "train_subset": 1500, "test_subset": 300}],
        "models": [{"name": "small_cnn", "width": 8}],
        "attacks": ["badnets", {"name": "blended", "alpha": 0.1}], "defenses": defenses, "seeds": [0],
        "train": {"epochs": 1, "batch_size": 128, "lr": 0.05, "milestones": [], "crop_padding": 2, "flip": False},
        "tsne": {"per_class": 5, "poisoned_per_class": 2}, "illustrations": {"count": COUNT}, **extra,
    }  # fmt: skip


DEFENSES = ["none", {"name": "shrinkpad", "pad": [0, 2, 4, 8]},
            {"name": "btidbf_p", "label": "btidbf_p", **BTIDBF_TINY}, {"name": "btidbf_u", "label": "btidbf_u", **BTIDBF_TINY}]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("figures")
    config = validate(tiny_config(DEFENSES, report={"figure2": {"shrinkpad": {"high": 4}}}), "test")
    with one_thread():
        cells, computed, _ = run_grid(config, root / "run", DataPaths(root / "data", root / "cache"), "cpu",
                                      tsne=True, workers=1)  # fmt: skip
    assert computed == len(cells) == 14
    shutil.rmtree(root / "cache")  # figures below come from the run directory alone
    return root / "run"


def by_label(run_dir: Path) -> dict[tuple[str, str], dict]:
    return {(r["attack"], r["defense_label"]): r for r in RecordStore(run_dir).read_all()}


# ----------------------------------------------------------------------------- Figure 2


def test_figure2_composes_curve_and_configured_tsne_panels(run: Path, monkeypatch) -> None:
    figures = figure_plan(run, RecordStore(run).read_all())
    assert [f.stem.name for f in figures] == ["figure2_shrinkpad"]
    rows = figures[0].rows
    assert [row.group["attack"] for row in rows] == ["badnets", "blended(alpha=0.1)"]
    # no defense, the smallest non-zero pad (default low) and the configured high pad 4 (not the largest, 8)
    assert [p.label for p in rows[0].panels] == ["no defense", "pad = 2", "pad = 4"]
    assert rows[0].panels[0].record["defense"] == "none"
    png = run / "figures" / "figure2_shrinkpad.png"
    assert png.is_file() and png.with_suffix(".pdf").is_file()  # drawn by the run itself
    assert "figures/figure2_shrinkpad.png" in (run / "report.html").read_text()
    before = png.stat().st_mtime_ns
    embedded = []
    real_embed = bench.report.tsne.embed
    monkeypatch.setattr(bench.report.tsne, "embed", lambda points, seed: embedded.append(1) or real_embed(points, seed))
    assert write_figure2(run, redraw=False) == []  # up to date: not drawn again
    assert write_figure2(run) == [png] and png.stat().st_mtime_ns >= before
    # Only the pad-4 panels are embedded: the t-SNE figures (none, pad 2, pad 8, ...) hold the others.
    assert len(embedded) == 2


def test_low_and_high_default_to_smallest_nonzero_and_largest() -> None:
    cells = [{"cell_id": str(v), "intensity": v} for v in (8, 0, 2, 4)]
    assert [r["intensity"] for r in pick_intensities(cells, {})] == [2, 8]
    assert [r["intensity"] for r in pick_intensities(cells, {"low": 0, "high": 4})] == [0, 4]
    assert [r["intensity"] for r in pick_intensities(cells[:2], {})] == [8]  # low and high the same cell: once


@pytest.mark.parametrize(("figure2", "message"), [
    ({"shrinkpad": {"low": 3}}, "report.figure2.shrinkpad.low: pad 3 is not among the grid's values [0, 2, 4, 8]"),
    ({"shrinkpad": {"low": 2.5}}, "report.figure2.shrinkpad.low:"),
    ({"shrinkpad": {"low": 4, "high": 2}}, "low must be smaller than high"),
    ({"bdmae": {"low": 0.1}}, "report.figure2.bdmae: no defense 'bdmae' with an intensity knob in the grid"),
    ({"shrinkpad": {"middle": 2}}, "middle"),
    ({"shrinkpad": {"high": ".inf"}}, "finite"),
])  # fmt: skip
def test_bad_figure2_values_are_one_line_and_exit_2_before_work(tmp_path: Path, capsys, figure2: dict,
                                                                message: str) -> None:  # fmt: skip
    raw = tiny_config(["none", {"name": "shrinkpad", "pad": [0, 2, 4, 8]}], report={"figure2": figure2})
    text = yaml.safe_dump(raw).replace("'.inf'", ".inf")
    (tmp_path / "grid.yaml").write_text(text)
    code = main(["run", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "run"), "--cache-dir",
                 str(tmp_path / "cache"), "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_figure2_config_compiles_with_its_choices() -> None:
    from bench.orchestration.config import load_config

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "figure2_cifar10.yaml")
    assert set(config.report.figure2) <= {"shrinkpad", "bdmae"}
    assert {spec.name for spec in config.defenses} >= {"shrinkpad", "bdmae"} and config.tsne.per_class > 0


# ----------------------------------------------------------------------------- Figure 3


def test_btidbf_cells_save_illustrations_of_the_same_images(run: Path) -> None:
    store, records = RecordStore(run), by_label(run)
    saved = {key: store.read_illustrations(r["cell_id"]) for key, r in records.items()}
    assert {key for key, item in saved.items() if item is not None} == {
        (a, d) for a in ("badnets", "blended") for d in ("btidbf_p", "btidbf_u")}  # others have no hook
    for attack in ("badnets", "blended"):
        purify, unlearn = saved[(attack, "btidbf_p")], saved[(attack, "btidbf_u")]
        assert list(purify.rows) == ["inverted", "purified"] and list(unlearn.rows) == ["inverted"]
        for image in (purify.clean, purify.poisoned, purify.rows["inverted"], purify.rows["purified"]):
            assert image.dtype == np.uint8 and image.shape == (COUNT, 1, 28, 28)
        assert np.array_equal(purify.index, unlearn.index) and np.array_equal(purify.poisoned, unlearn.poisoned)
        assert 0 not in purify.labels and purify.classes[0] == "0"
        assert not np.array_equal(purify.poisoned, purify.clean)  # the trigger is on the saved images
        assert not np.array_equal(purify.rows["inverted"], purify.clean)  # the generator changed them
    path = store.illustrations_path(records[("badnets", "btidbf_p")]["cell_id"])
    with np.load(path, allow_pickle=False) as archive:  # plain arrays only
        assert archive["poisoned"].dtype == np.uint8


def test_records_carry_btidbf_detected_target_and_nothing_for_other_defenses(run: Path) -> None:
    for (attack, label), record in by_label(run).items():
        findings = record["defense_findings"]
        if label.startswith("btidbf"):
            assert set(findings) == {"detected_target"} and findings["detected_target"] in range(10), (attack, label)
        else:
            assert findings == {}, (attack, label)


def test_figure3_names_the_detected_target_on_each_inverted_row(run: Path) -> None:
    (figure,) = [f for f in inversion_figure_plan(run, RecordStore(run).read_all()) if f.cells[0][0]["attack"] == "badnets"]
    labels = [label for label, _ in figure_rows(figure.cells) if label.startswith("inverted\n")]
    found = [by_label(run)[("badnets", d)]["defense_findings"]["detected_target"] for d in ("btidbf_p", "btidbf_u")]
    assert labels == [f"inverted\n{d}\ntarget found: {t}" for d, t in zip(("btidbf_p", "btidbf_u"), found)]  # MNIST: class t is "t"


def test_illustration_file_round_trips_and_rejects_damage(tmp_path: Path) -> None:
    images = torch.rand(3, 3, 8, 8)
    item = CellIllustrations.from_tensors(images, images, torch.tensor([1, 2, 1]), torch.tensor([0, 4, 7]), ["a", "b", "c"],
                                          {"inverted": images.flip(0)})  # fmt: skip
    save_illustrations(item, tmp_path / "i.npz")
    loaded = load_illustrations(tmp_path / "i.npz")
    assert loaded is not None and np.array_equal(loaded.rows["inverted"], item.rows["inverted"])
    assert loaded.classes == ["a", "b", "c"] and loaded.index.tolist() == [0, 4, 7]
    (tmp_path / "cut.npz").write_bytes((tmp_path / "i.npz").read_bytes()[:80])
    assert load_illustrations(tmp_path / "cut.npz") is None
    np.savez(tmp_path / "pickled.npz", clean=np.array([{"x": 1}], dtype=object))
    assert load_illustrations(tmp_path / "pickled.npz") is None
    with pytest.raises(ValueError, match="shape"):
        CellIllustrations.from_tensors(images, images, torch.zeros(3), torch.zeros(3), ["a"], {"inverted": images[:2]})
    with pytest.raises(ValueError, match="non-finite"):
        CellIllustrations.from_tensors(images, images, torch.zeros(3), torch.zeros(3), ["a"],
                                       {"inverted": images * float("nan")})  # fmt: skip


def test_figure3_is_drawn_per_attack_and_by_show_inversion(run: Path, tmp_path: Path, capsys) -> None:
    pngs = sorted((run / "figures").glob("figure3_*.png"))
    assert [p.name for p in pngs] == ["figure3_badnets.png", "figure3_blended-alpha-0-1.png"]
    assert "figures/figure3_badnets.png" in (run / "report.html").read_text()
    out = tmp_path / "inv.png"
    assert main(["show-inversion", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.glob("inv*.png")) == ["inv_badnets.png", "inv_blended-alpha-0-1.png"]
    assert write_inversion_figures(run) == pngs


def test_show_inversion_without_btidbf_cells_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    config = validate(tiny_config(["none"], attacks=["badnets"]), "test")
    with one_thread():
        run_grid(config, tmp_path / "run", DataPaths(tmp_path / "data", tmp_path / "cache"), "cpu", workers=1)
    assert not (tmp_path / "run" / "illustrations").exists()
    capsys.readouterr()
    assert main(["show-inversion", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no cell of the first seed saved illustration images" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["show-inversion", str(tmp_path / "nowhere")]) == 2


# ----------------------------------------------------------------------------- REFINE's benign-data sweep


def test_refine_benign_fraction_is_a_knob_that_sets_the_benign_count(tmp_path: Path) -> None:
    refine = {"name": "refine", "width": 4, "epochs": 1, "batch_size": 32, "milestones": [1],
              "benign_fraction": [0.02, 0.08]}  # fmt: skip
    raw = tiny_config([refine], attacks=["badnets"], holdout=0.1, tsne={"per_class": 0}, illustrations={"count": 0})
    cells = compile_grid(validate(raw, "test"))
    assert sorted(c.intensity for c in cells) == [0.02, 0.08]
    assert len({c.defense_key for c in cells}) == 2  # a new fit per share of benign data
    with one_thread():
        run_grid(validate(raw, "test"), tmp_path / "run", DataPaths(tmp_path / "data", tmp_path / "cache"), "cpu",
                 workers=1)  # fmt: skip
    fitted = {r["intensity"]: r["n_defense_fit"] for r in RecordStore(tmp_path / "run").read_all()}
    assert fitted == {0.02: 30, 0.08: 120}  # of 1,500 training images, drawn from the 150 held out
    assert [p.name for p in (tmp_path / "run" / "figures").glob("tradeoff-*refine*.png")]
    raw["defenses"][0]["benign_fraction"] = [0.02, 0.2]  # more than the holdout: refused before work
    with pytest.raises(BenchError, match="benign_fraction 0.2 needs 300 clean samples but the holdout has 150"):
        compile_grid(validate(raw, "test"))


def test_a_merge_of_slices_keeps_the_illustrations(run: Path, tmp_path: Path) -> None:
    assert main(["table", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert sorted(p.name for p in (tmp_path / "merged" / "illustrations").glob("*.npz")) == sorted(
        p.name for p in (run / "illustrations").glob("*.npz"))
    assert (tmp_path / "merged" / "figures" / "figure3_badnets.png").is_file()
