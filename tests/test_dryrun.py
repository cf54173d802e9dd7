"""``run --dry-run``: validates, lists cells and remaining work, and runs nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from bench.cli import main
from bench.core.registry import DEFENSES
from bench.orchestration.config import load_config, validate
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
        for defense in ("none", "shrinkpad", "bdmae", "btidbf_u", "btidbf_p", "refine"):
            assert any(f" {attack}" in line and f"/ {defense}" in line for line in todo), (attack, defense)
    # 7 backdoored models + the clean model the clean-label attack crafts its poison with,
    # each 150 epochs over the 40,000 images the attacker keeps.
    assert "model trainings: 8 x 150 epochs -> 48,000,000 image-passes" in out
    assert re.search(r"defense fits: 28 \(bdmae x7, btidbf_u x7, btidbf_p x7, refine x7\)", out)
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


def image_folder(root: Path, classes: int = 2, per_class: int = 40) -> Path:
    """A stand-in for a user's image folder (one-pixel PNGs: the grids that need one resize)."""
    from PIL import Image

    for split in ("train", "test"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (1, 1)).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path, tmp_path: Path) -> None:
    config = load_config(path)
    # Grids on an image folder (the ImageNet subset) read its class count and sizes from the data root.
    needs_folder = any(d.name == "imagefolder" and not d.params.get("root") for d in config.datasets)
    cells = compile_grid(config, image_folder(tmp_path / "data") if needs_folder else None)
    assert cells and len({c.cell_id for c in cells}) == len(cells)


# ----------------------------------------------------------------------------- wall time from measured rates

TIMED = {**TINY, "attacks": ["badnets", "blended"], "defenses": ["none", {"name": "refine", "width": 8, "epochs": 2}],
         "train": {**TINY["train"], "epochs": 3}}  # fmt: skip
FAKE_GPU = "cuda:0 (Fake GPU)"


def _write_rates(reference: Path) -> None:
    """Made-up throughput in the benchmarks' CSV layouts (a temp dir, never results/)."""
    (reference / "run-1").mkdir(parents=True)
    (reference / "run-1" / "training.csv").write_text(
        "model,recipe,precision,batch_size,epochs,train_img_per_s,epoch_est_s,train_est_s,eval_img_per_s,device\n"
        f"small_cnn,paper,bf16 autocast,256,3,1000,3.2,9.6,2000,{FAKE_GPU}\n"
        f"small_cnn,paper,bf16 autocast,128,3,900,3.6,10.7,2000,{FAKE_GPU}\n")  # fmt: skip
    (reference / "run-1" / "refine.csv").write_text(
        f"defense,width,precision,batch_size,fit_img_per_s,epoch_est_s,epochs,fit_est_s,device\n"
        f"refine,8,bf16 autocast,256,400,2,2,4,{FAKE_GPU}\nrefine,16,bf16 autocast,256,100,8,2,16,{FAKE_GPU}\n")  # fmt: skip


def test_dry_run_estimates_wall_time_from_measured_throughput(tmp_path, capsys, monkeypatch):
    from bench.orchestration.dryrun import fresh_plan, work_items
    from bench.orchestration.walltime import estimate, read_rates

    _write_rates(tmp_path / "results" / "reference")
    config = validate(TIMED, "test")
    rates = read_rates(tmp_path / "results" / "reference")
    assert list(rates) == [FAKE_GPU]
    est = estimate(work_items(config, fresh_plan(config)), rates[FAKE_GPU])
    # 2 trainings x 3 epochs x 3,200 images at 1,000/s (the batch-256 row); 4 evaluations of
    # 1,000 clean + 900 poisoned images at 2,000/s; 2 REFINE fits x 2 epochs x 800 images at 400/s.
    assert est.seconds == pytest.approx({"training": 19.2, "evaluation": 3.8, "refine fits": 8.0})
    assert est.missing == []

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(TIMED))
    monkeypatch.chdir(tmp_path)  # the default reference folder is ./results/reference
    assert main(["run", str(path), "--dry-run", "--only", "attacks=badnets", "--out", str(tmp_path / "run"),
                 "--cache-dir", str(tmp_path / "cache")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "ESTIMATE" in out
    # the slice: 1 training (9.6 s), 2 evaluations (1.9 s), 1 fit (4 s); the whole grid: twice that
    assert f"this slice on {FAKE_GPU}: 16 s (training 10 s + evaluation 2 s + refine fits 4 s)" in out
    assert f"the whole grid, from scratch on {FAKE_GPU}: 31 s (training 19 s + evaluation 4 s + refine fits 8 s)" in out


def test_dry_run_without_measurements_says_so_and_names_unmeasured_work(tmp_path, capsys, monkeypatch):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**TIMED, "defenses": ["none", {"name": "refine", "width": 4, "epochs": 2}]}))
    monkeypatch.chdir(tmp_path)
    argv = ["run", str(path), "--dry-run", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "wall time: not estimated -- no measured throughput in results/reference/ for any device" in out
    assert "model trainings: 2 x 3 epochs" in out and "ESTIMATE" not in out
    _write_rates(tmp_path / "results" / "reference")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "not included (no measured rate): fitting refine c=4 x2" in out


def test_grid_walltime_estimate_reads_the_reference_folder(tmp_path, capsys):
    from benchmarks import grid_walltime

    _write_rates(tmp_path / "reference")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(TIMED))
    assert grid_walltime.main(["estimate", str(path), "--reference", str(tmp_path / "reference")]) == 0
    out = capsys.readouterr().out
    assert f"the whole grid on {FAKE_GPU}: 31 s (training 19 s + evaluation 4 s + refine fits 8 s)" in out
