"""The GPU-first code paths, kept honest on the CPU.

The batched poisoning path must deliver what a per-sample ``__getitem__`` pipeline delivers
(otherwise the benchmark's ratio compares different work); the device comes from the config and
nothing in training or evaluation assumes CUDA; the benchmark scripts run with ``--device cpu``
and write the CSV the documentation describes. FLOP counting, step timing and the peak table
have their own tests in ``test_benchmark_compute.py``.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.core.device import resolve_device, to_float
from bench.core.errors import BenchError
from bench.core.metrics import predict_labels
from bench.core.models import build_model
from bench.core.registry import ATTACKS, DEFENSES
from bench.nn.train import TrainRecipe, make_scheduler, train_classifier
from bench.orchestration.config import load_config
from bench.orchestration.grid import compile_grid
from benchmarks import grid_walltime, poisoning, training
from benchmarks.common import random_subset, recipe_settings

REPO = Path(__file__).resolve().parent.parent
PAPER_ATTACKS = ["badnets", "blended", "wanet", "physical_ba", "batt", "label_consistent", "adaptive_patch"]
PAPER_DEFENSES = ["none", "shrinkpad", "bdmae", "btidbf_u", "btidbf_p", "refine"]


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny kernels; with two OpenMP threads on a busy 2-core machine each
    kernel waits at a barrier for a descheduled thread (measured: ~20x slower than one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _epoch(cifar10, name: str, n: int = 300):
    train = random_subset(cifar10.train, n)
    attack = poisoning.fitted_attack(name, train, torch.device("cpu"))
    return poisoning.epoch_setup(name, attack, train, rate=0.1, target=0)


@pytest.mark.parametrize("name", sorted(poisoning.REFERENCES))
def test_both_poisoning_paths_deliver_the_same_epoch_on_real_images(cifar10, name):
    setup = _epoch(cifar10, name)
    expected = round(setup.attack.poisoning_rate(0.1) * len(setup.train)) + setup.poisoned.cover_index.numel()
    assert len(setup.dataset.triggered) == expected > 0
    agreement = poisoning.compare_epochs(name, setup, batch=32, device=torch.device("cpu"))  # 300 = 9 x 32 + 12
    if poisoning.REFERENCES[name].uint8_exact:
        assert agreement.max_diff_uint8 == 0 and agreement.uint8_mismatches == 0
    else:  # the per-sample path keeps a float warp; the harness a uint8 one
        assert 0 < agreement.max_diff_uint8 <= 0.5 + 255 * poisoning.FLOAT_SLACK


def test_the_epoch_streams_carry_the_trigger_and_the_attackers_labels(cifar10):
    setup = _epoch(cifar10, "badnets")
    index = setup.poisoned.poisoned_index
    for stream in (poisoning.batched_epoch, poisoning.per_sample_epoch):
        batches = list(stream(setup, 64, torch.device("cpu")))
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        assert x.dtype == torch.float32 and x.shape == (300, 3, 32, 32)
        assert bool((x[index][:, :, -3:, -3:] == 1).all())  # the white 3x3 patch, bottom-right
        clean = torch.ones(300, dtype=torch.bool)
        clean[index] = False
        assert torch.equal(x[clean], to_float(setup.train.x[clean]))
        assert bool((y[index] == 0).all()) and torch.equal(y[clean], setup.train.y[clean])


def test_the_agreement_check_fails_when_a_path_skips_the_trigger(cifar10, monkeypatch):
    def no_trigger(attack, poisoned, shape):
        return lambda index, image: poisoning.TO_TENSOR(image)

    monkeypatch.setitem(poisoning.REFERENCES, "badnets", poisoning.Reference(no_trigger, True))
    setup = _epoch(cifar10, "badnets")
    with pytest.raises(BenchError, match="differs from the batched one"):
        poisoning.compare_epochs("badnets", setup, batch=32, device=torch.device("cpu"))


def test_attacks_without_a_per_sample_path_are_refused_before_any_work(cifar_paths, capsys):
    assert poisoning.main(_args(cifar_paths, "--attacks", "label_consistent")) == 2
    assert "no per-sample reference path" in capsys.readouterr().err


def _args(cifar_paths, *extra: str) -> list[str]:
    return ["--device", "cpu", "--data-root", str(cifar_paths.data_root), "--cache-dir", str(cifar_paths.cache_dir),
            "--repeats", "1", *extra]  # fmt: skip


def test_poisoning_benchmark_runs_on_cpu_and_writes_the_documented_csv(tmp_path, cifar10, cifar_paths, capsys):
    out = tmp_path / "poisoning.csv"
    argv = _args(cifar_paths, "--attacks", "badnets", "wanet", "--images", "512", "--csv", str(out))
    assert poisoning.main(argv) == 0
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == poisoning.CSV_COLUMNS
    assert [r["attack"] for r in rows] == ["badnets", "wanet"]
    for r in rows:
        batched_s, per_sample_s = float(r["batched_s"]), float(r["per_sample_s"])
        assert int(r["triggered"]) == round(0.1 * 512) and r["device"].startswith("cpu")
        assert float(r["batched_img_per_s"]) == pytest.approx(512 / batched_s, rel=0.01)
        assert float(r["per_sample_img_per_s"]) == pytest.approx(512 / per_sample_s, rel=0.01)
        assert float(r["ratio"]) == pytest.approx(per_sample_s / batched_s, rel=0.01)
    assert float(rows[0]["max_diff_uint8"]) == 0 and 0 < float(rows[1]["max_diff_uint8"]) <= 0.51
    assert "outputs agree" in capsys.readouterr().out


def test_benchmark_user_errors_exit_2_with_one_line(cifar_paths, capsys):
    assert poisoning.main(_args(cifar_paths, "--attacks", "no_such_attack")) == 2
    assert "unknown attack 'no_such_attack'" in capsys.readouterr().err
    assert training.main(_args(cifar_paths, "--recipes", str(REPO / "missing.yaml"))) == 2
    assert "does not exist" in capsys.readouterr().err


def test_training_benchmark_measures_on_cpu(tmp_path, cifar10, cifar_paths):
    out = tmp_path / "training.csv"
    argv = _args(cifar_paths, "--models", "small_cnn", "--recipes", "fast", "--steps", "1", "--warmup", "1",
                 "--eval-images", "256", "--csv", str(out))  # fmt: skip
    assert training.main(argv) == 0
    with open(out, newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    recipe, holdout, _ = recipe_settings("fast")
    rate = float(row["train_img_per_s"])
    n_train = len(cifar10.train) - round(holdout * len(cifar10.train))
    assert rate > 0 and float(row["eval_img_per_s"]) > 0 and row["device"].startswith("cpu")
    expected_epoch = (n_train // recipe.batch_size) * recipe.batch_size / rate
    assert float(row["epoch_est_s"]) == pytest.approx(expected_epoch, rel=0.01)
    assert float(row["train_est_s"]) == pytest.approx(expected_epoch * recipe.epochs, rel=0.01)
    assert row["precision"] == "fp32" and row["peak_tflops"] == row["peak_pct"] == "unknown"
    gflop = float(row["gflop_per_img"])
    assert gflop > 0 and float(row["achieved_tflops"]) == pytest.approx(gflop * rate / 1000, rel=0.01)


def test_device_comes_from_the_config_and_cuda_is_never_assumed(monkeypatch):
    assert load_config(REPO / "configs" / "fast_cifar_resnet18.yaml").device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(BenchError, match="CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"  # chosen, not initialised


def test_gpu_recipe_flags_are_harmless_on_the_cpu(mnist, monkeypatch):
    """bf16 autocast, channels_last and the fast recipe's schedule train a real model on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fast, _, _ = recipe_settings("fast")
    assert fast.amp and fast.channels_last and fast.schedule == "onecycle" and fast.label_smoothing > 0
    recipe = replace(fast, epochs=1, batch_size=32, lr=0.1, flip=False, crop_padding=2)
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, width=8)
    model = train_classifier(model, mnist.train.x[:3000], mnist.train.y[:3000], recipe, torch.device("cpu"), seed=0)
    assert not model.training and all(p.device.type == "cpu" for p in model.parameters())
    assert not torch.cuda.is_initialized()
    accuracy = (predict_labels(model, mnist.test.x, torch.device("cpu")) == mnist.test.y).float().mean()
    assert accuracy > 0.5  # chance is 0.1


def test_large_evaluation_batches_give_the_same_labels(cifar10):
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 3, width=8).eval()
    images = cifar10.test.x[:50]
    one_batch = predict_labels(model, images, torch.device("cpu"), batch_size=4096)
    assert torch.equal(one_batch, predict_labels(model, images, torch.device("cpu"), batch_size=7))
    assert one_batch.shape == (50,) and one_batch.device.type == "cpu"


def test_fast_recipe_config_is_a_short_one_cycle_run_of_the_paper_setup():
    config = load_config(REPO / "configs" / "fast_cifar_resnet18.yaml")
    paper = TrainRecipe()
    assert config.train.schedule == "onecycle" and 0 < config.train.label_smoothing < 1
    assert config.train.epochs < paper.epochs
    assert [m.name for m in config.models] == ["cifar_resnet18"] and [a.name for a in config.attacks] == ["badnets"]
    assert (config.poison.rate, config.poison.target) == (0.1, 0)
    assert len(compile_grid(config)) == 1


def test_paper_grid_uses_the_paper_recipe_and_every_paper_method():
    config = load_config(REPO / "configs" / "cifar10_paper.yaml")
    assert config.train == TrainRecipe(crop_padding=0)  # the paper recipe, with the REFINE code's flip-only augmentation
    assert [a.name for a in config.attacks] == PAPER_ATTACKS
    assert [d.name for d in config.defenses] == PAPER_DEFENSES
    assert all(name in ATTACKS for name in PAPER_ATTACKS)
    missing = [name for name in PAPER_DEFENSES if name not in DEFENSES]
    if missing:
        pytest.skip(f"defenses not registered yet: {missing}")
    assert len(compile_grid(config)) == len(PAPER_ATTACKS) * len(PAPER_DEFENSES)


@pytest.mark.parametrize("total_steps", [1, 2, 3, 4, 5, 8, 40])
def test_one_cycle_schedule_works_for_any_run_length(total_steps):
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=0.2)
    recipe = TrainRecipe(epochs=total_steps, lr=0.2, schedule="onecycle")
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch=1)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) <= 0.2 + 1e-9
    if total_steps >= 5:
        assert lrs[0] < max(lrs) and lrs[-1] < max(lrs)  # warm up, then anneal


def test_grid_estimate_is_trainings_times_epochs_plus_fits_plus_evaluation(tmp_path):
    training_csv, refine_csv, out = tmp_path / "training.csv", tmp_path / "refine.csv", tmp_path / "estimate.csv"
    training_csv.write_text("model,recipe,batch_size,epochs,train_img_per_s,epoch_est_s,train_est_s,eval_img_per_s,device\n"
                            "cifar_resnet18,paper,128,150,1000,40,6000,1900,cuda:0 (X)\n")  # fmt: skip
    refine_csv.write_text("defense,width,batch_size,fit_img_per_s,epoch_est_s,epochs,fit_est_s,device\n"
                          "refine,64,256,500,20,150,3000,cuda:0 (X)\n")  # fmt: skip
    argv = ["estimate", str(REPO / "configs" / "cifar10_paper.yaml"), "--training-csv", str(training_csv),
            "--refine-csv", str(refine_csv), "--csv", str(out)]  # fmt: skip
    assert grid_walltime.main(argv) == 0
    with open(out, newline="") as fh:
        rows = {r["component"]: r for r in csv.DictReader(fh)}
    # 7 backdoored models + the clean model Label-Consistent needs; 42 cells; one REFINE fit per model.
    trainings, cells, fits = len(PAPER_ATTACKS) + 1, len(PAPER_ATTACKS) * len(PAPER_DEFENSES), len(PAPER_ATTACKS)
    assert int(rows["train cifar_resnet18 (150 epochs)"]["count"]) == trainings
    assert int(rows["fit refine c=64"]["count"]) == fits
    expected = trainings * 40 * 150 + cells * 19_000 / 1900 + fits * 3000
    assert float(rows["total (estimate)"]["total_s"]) == pytest.approx(expected)


def test_grid_measure_reads_job_and_cell_seconds(tmp_path):
    (tmp_path / "jobs").mkdir()
    for name, kind, state, seconds in [("a", "model", "done", 5.0), ("b", "model", "failed", 9.0), ("c", "defense", "done", 2.5)]:
        (tmp_path / "jobs" / f"{name}.json").write_text(f'{{"kind": "{kind}", "state": "{state}", "seconds": {seconds}}}')
    assert grid_walltime.stage_seconds(tmp_path) == {"model": 5.0, "defense": 2.5}
