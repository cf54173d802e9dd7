"""The GPU-first code paths, kept honest on the CPU.

The batched poisoning path must produce exactly what a per-sample ``__getitem__`` pipeline
produces (otherwise the benchmark's ratio compares different work); the device comes from the
config and nothing in training or evaluation assumes CUDA; the benchmark scripts run with
``--device cpu`` and write the CSV the documentation describes.
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
from benchmarks.common import recipe_settings

REPO = Path(__file__).resolve().parent.parent
PAPER_ATTACKS = ["badnets", "blended", "wanet", "physical_ba", "batt", "label_consistent", "adaptive_patch"]
PAPER_DEFENSES = ["none", "shrinkpad", "bdmae", "btidbf", "refine"]


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny kernels; with two OpenMP threads on a busy 2-core machine each
    kernel waits at a barrier for a descheduled thread (measured: ~20x slower than one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_batched_poisoning_equals_the_per_sample_reference_on_real_images(cifar10, name):
    attack = poisoning.fitted_attack(name, cifar10.train.subset(torch.arange(500)), torch.device("cpu"))
    images = cifar10.test.x[:37]  # 37: the chunks of 16 end with a ragged one
    reference = poisoning.per_sample_poison(attack, poisoning.as_stored_arrays(images))
    batched = poisoning.batched_poison(attack, images, chunk=16, keep=len(images))
    assert batched.dtype == reference.dtype == torch.float32
    assert torch.equal(batched, reference)
    assert torch.equal(batched, to_float(attack.apply(images)))  # chunking changes nothing


def test_both_poisoning_paths_actually_apply_the_trigger(cifar10):
    attack = poisoning.fitted_attack("badnets", cifar10.train, torch.device("cpu"))
    images = cifar10.test.x[:8]
    reference = poisoning.per_sample_poison(attack, poisoning.as_stored_arrays(images))
    assert bool((reference[:, :, -3:, -3:] == 1).all())  # the white 3x3 patch, bottom-right
    assert torch.equal(reference[:, :, :29], to_float(images)[:, :, :29])


def test_chunk_size_follows_the_device():
    cifar = poisoning.auto_chunk(torch.device("cpu"), (3, 32, 32))
    assert 8 <= cifar and cifar * 3 * 32 * 32 * 4 <= poisoning.CPU_CHUNK_BYTES
    assert poisoning.auto_chunk(torch.device("cpu"), (3, 224, 224)) >= 8
    assert poisoning.auto_chunk(torch.device("cuda"), (3, 32, 32)) > cifar


def _args(cifar_paths, *extra: str) -> list[str]:
    return ["--device", "cpu", "--data-root", str(cifar_paths.data_root), "--cache-dir", str(cifar_paths.cache_dir),
            "--repeats", "1", *extra]  # fmt: skip


def test_poisoning_benchmark_runs_on_cpu_and_writes_the_documented_csv(tmp_path, cifar10, cifar_paths, capsys):
    out = tmp_path / "poisoning.csv"
    argv = _args(cifar_paths, "--attacks", "badnets", "blended", "--images", "512", "--limit", "48", "--csv", str(out))
    assert poisoning.main(argv) == 0
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["attack", "batched_img_per_s", "per_sample_img_per_s", "ratio", "device"]
    assert [r["attack"] for r in rows] == ["badnets", "blended"]
    for r in rows:
        batched, per_sample = float(r["batched_img_per_s"]), float(r["per_sample_img_per_s"])
        assert batched > 0 and per_sample > 0 and r["device"].startswith("cpu")
        assert float(r["ratio"]) == pytest.approx(batched / per_sample, rel=0.01)
    printed = capsys.readouterr().out
    assert "extrapolated from 48 timed images to 512" in printed and "max_abs_diff" in printed


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
    assert float(row["epoch_s"]) == pytest.approx(expected_epoch, rel=0.01)
    assert float(row["train_est_s"]) == pytest.approx(expected_epoch * recipe.epochs, rel=0.01)


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
    assert config.train == TrainRecipe()  # the paper recipe is the default
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
    training_csv.write_text("model,recipe,batch_size,epochs,train_img_per_s,epoch_s,train_est_s,eval_img_per_s,device\n"
                            "cifar_resnet18,paper,128,150,1000,40,6000,1900,cuda:0 (X)\n")  # fmt: skip
    refine_csv.write_text("defense,width,batch_size,fit_img_per_s,epoch_s,epochs,fit_est_s,device\n"
                          "refine,64,256,500,20,150,3000,cuda:0 (X)\n")  # fmt: skip
    argv = ["estimate", str(REPO / "configs" / "cifar10_paper.yaml"), "--training-csv", str(training_csv),
            "--refine-csv", str(refine_csv), "--csv", str(out)]  # fmt: skip
    assert grid_walltime.main(argv) == 0
    with open(out, newline="") as fh:
        rows = {r["component"]: r for r in csv.DictReader(fh)}
    # 7 backdoored models + the clean model Label-Consistent needs; 35 cells; one REFINE fit per model.
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
