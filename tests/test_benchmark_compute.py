"""The benchmarks' compute figures: FLOPs of exactly one real step, timed steps, device peaks,
CPU bf16 autocast of REFINE's loss, and concurrent runs.

A FLOP count is only worth printing if it is the count of the step the loop really runs, so the
tests compare the count of the first step inside ``Refine.fit`` and ``train_classifier`` with
counts of whole runs; no test asserts a timing.
"""

from __future__ import annotations

import csv

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.core.device import to_float
from bench.core.errors import BenchError
from bench.core.models import build_model
from bench.nn.train import TrainRecipe
from benchmarks import concurrency, refine_fit, training
from benchmarks.common import (
    DEVICE_PEAKS,
    StepMeter,
    compute_figures,
    device_peak,
    peak_for_name,
    random_subset,
    seeded_model,
)
from defenses import refine as refine_module

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _args(cifar_paths, *extra: str) -> list[str]:
    return ["--device", "cpu", "--data-root", str(cifar_paths.data_root), "--cache-dir", str(cifar_paths.cache_dir),
            "--repeats", "1", *extra]  # fmt: skip


# --------------------------------------------------------------------------- FLOPs of one real step


def test_the_counted_refine_step_is_the_fit_minus_its_end_of_fit_check(mnist):
    """A one-step fit runs set-up (no FLOPs), one step, and a U-Net forward over the same images
    to check for saturation: the meter's count of the first step must be exactly the rest."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, width=8).eval()
    batch = 16
    train = mnist.train.subset(torch.arange(64))
    run = refine_fit.refine_fit_runner(4, batch, model, train, CPU)
    with FlopCounterMode(display=False) as whole:
        defense = run(1)
    check = flops_of(lambda: defense._unet(to_float(train.x[:batch])))
    with StepMeter(CPU, steps=1) as meter:
        run(2)
    assert meter.flops is not None and meter.flops > 0
    assert meter.flops == whole.get_total_flops() - check
    # the step holds three passes of the frozen model (pseudo-labels, forward, backward to the input)
    assert meter.flops > 3 * flops_of(lambda: model(to_float(train.x[:batch])))


def test_the_counted_training_step_is_the_whole_one_step_run(mnist):
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, width=8)
    recipe = TrainRecipe(epochs=1, batch_size=32, amp=False)
    run = training.training_runner(model, mnist.train.subset(torch.arange(128)), recipe, CPU)
    whole = flops_of(lambda: run(1))
    with StepMeter(CPU, steps=2) as meter:
        run(3)
    assert meter.flops == whole > 2 * flops_of(lambda: model(to_float(mnist.train.x[:32])))
    assert meter.seconds > 0


def test_the_meter_needs_all_its_steps_and_leaves_no_hook_behind():
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=0.1)

    def steps(k: int) -> None:
        for _ in range(k):
            param.grad = torch.ones(1)
            optimizer.step()

    with pytest.raises(BenchError, match="fewer than the 4 measured"):
        with StepMeter(CPU, steps=3) as short:
            steps(2)
    with StepMeter(CPU, steps=3) as meter:
        steps(5)  # steps after the window are not timed
    assert meter._seen == 5 and meter.start is not None and meter.end >= meter.start
    steps(1)
    assert meter._seen == 5 and short._seen == 2  # the global hooks are gone
    assert meter.flops == 0  # an optimizer update is no matmul


# --------------------------------------------------------------------------- peaks


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.5),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200", 989.5),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L40", None),
        ("NVIDIA A10", 125.0),
        ("NVIDIA A10G", None),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("NVIDIA GeForce RTX 4090 D", None),
        ("Tesla V100-SXM2-16GB", 125.0),
        ("Tesla V100-PCIE-16GB", None),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),
        ("Some Future GPU", None),
    ],
)
def test_peaks_come_from_the_table_and_unknown_devices_get_none(name, tflops):
    peak = peak_for_name(name)
    assert (peak.tflops if peak else None) == tflops


def test_peak_table_entries_are_dense_figures_with_a_source():
    assert all(p.dtype in ("bf16", "fp16") and p.source and 0 < p.tflops < 2000 for p in DEVICE_PEAKS)
    assert peak_for_name("Tesla V100-SXM2-32GB").dtype == "fp16"  # Volta has no bf16 tensor cores


def test_cpu_figures_say_unknown_and_gpu_figures_are_a_share_of_the_peak():
    assert device_peak(CPU) is None
    cpu = compute_figures(2e9, 0.5, 4, None)
    assert cpu["peak_tflops"] == cpu["peak_pct"] == "unknown" and cpu["achieved_tflops"] == pytest.approx(0.004)
    h100 = compute_figures(int(4.9475e12), 0.01, 256, peak_for_name("NVIDIA H100 80GB HBM3"))
    assert h100["achieved_tflops"] == pytest.approx(494.75, rel=1e-3) and h100["peak_pct"] == pytest.approx(50.0, rel=1e-3)
    assert h100["gflop_per_img"] == pytest.approx(4.9475e12 / 256 / 1e9, rel=1e-3)
    assert compute_figures(None, 0.5, 4, None)["gflop_per_img"] == "unknown"


# --------------------------------------------------------------------------- REFINE on the CPU in bf16


def test_cpu_bf16_runs_refines_loss_under_autocast_and_nothing_else(mnist, monkeypatch):
    """``--cpu-bf16`` fits with ``cpu_bf16: true``: the U-Net runs in bf16 inside the loss only; the
    augmentation before it and the end-of-fit check after it stay fp32."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, width=8).eval()
    augment_autocast: list[bool] = []
    augment = refine_module.refine_augment

    def watched_augment(*args, **kwargs):
        augment_autocast.append(torch.is_autocast_enabled("cpu"))
        return augment(*args, **kwargs)

    monkeypatch.setattr(refine_module, "refine_augment", watched_augment)
    seen: list[torch.dtype] = []
    build = refine_module.Refine._build_unet

    def watched_build(self, *args):
        unet = build(self, *args)
        unet.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
        return unet

    monkeypatch.setattr(refine_module.Refine, "_build_unet", watched_build)
    defense = refine_fit.refine_fit_runner(4, 8, model, mnist.train.subset(torch.arange(16)), CPU, cpu_bf16=True)(2)
    assert defense.params.cpu_bf16
    assert seen == [torch.bfloat16, torch.bfloat16, torch.float32]  # two steps, then the saturation check
    assert augment_autocast == [False, False]
    assert torch.isfinite(torch.tensor(defense._fit_loss))


def test_refine_benchmark_measures_fp32_and_bf16_side_by_side(tmp_path, cifar10, cifar_paths, capsys):
    out = tmp_path / "refine.csv"
    argv = _args(cifar_paths, "--widths", "4", "--batch-size", "8", "--steps", "1", "--model", "small_cnn",
                 "--cpu-bf16", "--csv", str(out))  # fmt: skip
    assert refine_fit.main(argv) == 0
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == refine_fit.CSV_COLUMNS
    assert [r["precision"] for r in rows] == ["fp32", refine_fit.CPU_BF16]
    assert rows[0]["gflop_per_img"] == rows[1]["gflop_per_img"]  # the same step, whatever the precision
    for r in rows:
        rate, gflop = float(r["fit_img_per_s"]), float(r["gflop_per_img"])
        assert gflop > 0 and float(r["achieved_tflops"]) == pytest.approx(gflop * rate / 1000, rel=0.01)
        assert r["peak_pct"] == "unknown" and float(r["loss"]) > 0
    printed = capsys.readouterr().out
    assert "c=4: mean loss of the same 2 steps" in printed and "ESTIMATES" in printed


def test_refine_benchmark_refuses_bad_arguments_before_any_work(cifar_paths, capsys):
    assert refine_fit.main(_args(cifar_paths, "--steps", "0")) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert refine_fit.main(_args(cifar_paths, "--model", "no_such_model")) == 2
    assert "unknown model" in capsys.readouterr().err


# --------------------------------------------------------------------------- concurrency


def test_concurrent_jobs_run_in_separate_processes_and_their_images_add_up(tmp_path, cifar10, cifar_paths):
    out = tmp_path / "concurrency.csv"
    argv = _args(cifar_paths, "--jobs", "refine", "train", "--procs", "2", "--steps", "1", "--batch-size", "4",
                 "--width", "4", "--model", "small_cnn", "--images", "64", "--threads", "1", "--csv", str(out))  # fmt: skip
    assert concurrency.main(argv) == 0
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == concurrency.CSV_COLUMNS
    assert [(r["job"], r["process"]) for r in rows] == [("refine", "0"), ("refine", "1"), ("refine", "all"),
                                                        ("train", "0"), ("train", "1"), ("train", "all")]  # fmt: skip
    for job in ("refine", "train"):
        procs = [r for r in rows if r["job"] == job and r["process"] != "all"]
        (total,) = [r for r in rows if r["job"] == job and r["process"] == "all"]
        assert all(int(r["images"]) == 1 * 4 for r in procs)  # one timed step of 4 images each
        assert int(total["images"]) == sum(int(r["images"]) for r in procs) == 8
        assert float(total["seconds"]) >= max(float(r["seconds"]) for r in procs) > 0  # the union of the windows
        for r in [*procs, total]:
            assert float(r["img_per_s"]) == pytest.approx(int(r["images"]) / float(r["seconds"]), rel=0.01)
        assert total["scaling"] == ""  # no one-process run to compare with


def test_a_failing_worker_fails_the_run_with_one_line(cifar_paths, capsys):
    argv = _args(cifar_paths, "--jobs", "train", "--procs", "1", "--steps", "100", "--batch-size", "4",
                 "--model", "small_cnn", "--images", "64", "--threads", "1")  # fmt: skip
    assert concurrency.main(argv) == 2  # 101 steps of 4 need more than 64 images
    assert "a worker failed: BenchError" in capsys.readouterr().err


def test_random_subset_mixes_classes(cifar10):
    subset = random_subset(cifar10.train, 200)
    assert len(subset) == 200 and len(set(subset.y.tolist())) == 10
    assert random_subset(cifar10.train, None) is cifar10.train


def test_every_row_starts_from_the_same_model_weights(cifar10):
    before = torch.random.get_rng_state()
    first, second = seeded_model("small_cnn", cifar10.train), seeded_model("small_cnn", cifar10.train)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True))
    assert torch.equal(torch.random.get_rng_state(), before)  # the global stream is left alone
    other = seeded_model("small_cnn", cifar10.train, seed=1)
    assert not torch.equal(next(iter(first.parameters())), next(iter(other.parameters())))
