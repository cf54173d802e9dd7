"""The one training loop: CPU numbers of a plain fp32 loop, non-finite losses fail the fit, the
CUDA-only settings are no-ops or restored fallbacks on the CPU, CPU bf16 stays close to fp32."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gridrun import one_thread

from bench.core.device import to_float
from bench.core.errors import BenchError
from bench.core.models import build_model
from bench.nn import augment
from bench.nn.loop import Batches, _autotuning, _channels_last, fit_loop, make_optimizer
from bench.nn.train import TrainRecipe, make_scheduler, train_classifier
from defenses.refine import Refine

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


def reference_training(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: TrainRecipe,
                       seed: int) -> torch.nn.Module:  # fmt: skip
    """Training written out as a plain fp32 loop: what ``train_classifier`` must compute on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)  # fmt: skip
    steps = max(1, len(images) // recipe.batch_size)
    scheduler = make_scheduler(optimizer, recipe, steps)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(images), generator=gen)
        for step in range(steps):
            idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            x = augment.random_crop(to_float(images[idx]), recipe.crop_padding, gen)
            x = augment.random_flip(x, gen)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@pytest.mark.parametrize("schedule", ["multistep", "onecycle"])
def test_training_on_the_cpu_is_bit_identical_to_a_plain_fp32_loop(mnist, schedule: str) -> None:
    recipe = TrainRecipe(epochs=2, batch_size=64, lr=0.05, schedule=schedule, milestones=[1], label_smoothing=0.1)
    images, labels = mnist.train.x[:400], mnist.train.y[:400]
    torch.manual_seed(0)
    ours = train_classifier(build_model("small_cnn", 10, 1, width=8), images, labels, recipe, CPU, seed=3)
    torch.manual_seed(0)
    theirs = reference_training(build_model("small_cnn", 10, 1, width=8), images, labels, recipe, seed=3)
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys()
    assert all(torch.equal(mine[k], ref[k]) for k in mine)
    assert not ours.training
    assert any(not torch.equal(v, w) for v, w in zip(mine.values(), build_model("small_cnn", 10, 1, width=8).state_dict().values()))


def test_a_huge_learning_rate_fails_the_training_with_one_clear_line(mnist) -> None:
    recipe = TrainRecipe(epochs=2, batch_size=50, lr=1e6, milestones=[])
    with pytest.raises(BenchError, match=r"^train small_cnn \[badnets\]: the loss became nan at epoch 1; lower train.lr$"):
        train_classifier(build_model("small_cnn", 10, 1, width=8), mnist.train.x[:500], mnist.train.y[:500], recipe,
                         CPU, seed=0, desc="train small_cnn [badnets]")  # fmt: skip


def tiny_fit(values: list[list[float]], epochs: int) -> tuple[float, list[float]]:
    """A one-weight fit whose per-step loss is ``values[epoch][step]`` (the weight gets a zero
    gradient, so one non-finite step leaves the next ones as given); returns the last epoch's mean
    and the batch sizes it saw."""
    w = torch.nn.Parameter(torch.ones(()))
    optimizer = torch.optim.SGD([w], lr=0.0)
    steps = len(values[0])
    seen: list[float] = []
    calls = iter([v for epoch in values for v in epoch])

    def loss(idx: torch.Tensor) -> torch.Tensor:
        seen.append(float(idx.numel()))
        return w * 0.0 + next(calls)

    batches = Batches(steps, 1, torch.Generator().manual_seed(0), lambda idx: idx)
    mean = fit_loop(optimizer, batches, loss, epochs, device=CPU, job="tiny fit", hint="lower lr")
    return mean, seen


def test_the_loop_returns_the_last_epochs_mean_loss() -> None:
    mean, seen = tiny_fit([[1.0, 2.0, 3.0], [4.0, 6.0, 8.0]], epochs=2)
    assert mean == pytest.approx(6.0)
    assert seen == [1.0] * 6


@pytest.mark.parametrize(
    "values, message",
    [
        ([[1.0, 2.0], [3.0, float("nan")], [1.0, 1.0]], "tiny fit: the loss became nan at epoch 2; lower lr"),
        ([[float("inf"), 2.0], [1.0, 1.0], [1.0, 1.0]], "tiny fit: the loss became inf at epoch 1; lower lr"),
        ([[1.0, 2.0], [1.0, 1.0], [1.0, -float("inf")]], "tiny fit: the loss became -inf at epoch 3; lower lr"),
    ],
)
def test_a_non_finite_loss_fails_at_the_end_of_its_epoch(values, message) -> None:
    with pytest.raises(BenchError, match=f"^{message}$"):
        tiny_fit(values, epochs=3)


def test_batches_drop_the_ragged_last_batch_but_keep_at_least_one() -> None:
    gen = torch.Generator().manual_seed(0)
    full = list(Batches(10, 4, gen, lambda idx: idx))
    assert [len(b) for b in full] == [4, 4]
    assert len(torch.cat(full).unique()) == 8
    assert [len(b) for b in Batches(3, 4, gen, lambda idx: idx)] == [3]
    every = list(Batches(10, 4, gen, lambda idx: idx, drop_last=False))
    assert [len(b) for b in every] == [4, 4, 2]
    assert sorted(torch.cat(every).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="positive batch size"):
        Batches(10, 0, gen, lambda idx: idx)


def test_the_autotuner_is_for_cuda_outside_deterministic_mode_and_restored_after() -> None:
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with _autotuning(CPU):
            assert not torch.backends.cudnn.benchmark
        with _autotuning(torch.device("cuda")):
            assert torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.benchmark
        torch.use_deterministic_algorithms(True)
        with _autotuning(torch.device("cuda")):
            assert not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = before


def test_cpu_bf16_training_runs_in_bf16_and_stays_close_to_fp32(mnist) -> None:
    images, labels = mnist.train.x[:256], mnist.train.y[:256]
    states = {}
    for cpu_bf16 in (False, True):
        torch.manual_seed(0)
        model = build_model("small_cnn", 10, 1, width=8)
        dtypes: list[torch.dtype] = []
        model.head.register_forward_hook(lambda module, args, out, seen=dtypes: seen.append(out.dtype))
        recipe = TrainRecipe(epochs=1, batch_size=64, lr=0.05, milestones=[], cpu_bf16=cpu_bf16)
        train_classifier(model, images, labels, recipe, CPU, seed=0)
        assert set(dtypes) == {torch.bfloat16 if cpu_bf16 else torch.float32}
        states[cpu_bf16] = torch.cat([p.detach().flatten() for p in model.parameters()])
    fp32, bf16 = states[False], states[True]
    assert torch.isfinite(bf16).all()
    assert not torch.equal(fp32, bf16)
    assert (bf16 - fp32).norm() < 0.02 * fp32.norm()


def test_cpu_bf16_refine_fit_stays_close_to_fp32(mnist) -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, width=8).eval()
    benign = mnist.train.subset(torch.arange(96))
    fits = {}
    for cpu_bf16 in (False, True):
        defense = Refine(width=4, epochs=1, batch_size=32, cpu_bf16=cpu_bf16)
        defense.bind(model, CPU, 0)
        defense.fit(benign, torch.Generator().manual_seed(0))
        fits[cpu_bf16] = defense
    fp32, bf16 = fits[False], fits[True]
    assert math.isfinite(bf16._fit_loss)
    assert bf16._fit_loss == pytest.approx(fp32._fit_loss, rel=0.05)
    weights = {name: torch.cat([p.flatten() for p in d._unet.parameters()]) for name, d in fits.items()}
    assert not torch.equal(weights[False], weights[True])
    assert (weights[True] - weights[False]).norm() < 0.02 * weights[False].norm()


def test_a_shown_figure_and_postfix_leave_the_returned_loss_alone() -> None:
    w = torch.nn.Parameter(torch.ones(()))
    calls: list[int] = []

    def loss(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return w * 0.0 + 2.0, torch.tensor(float("nan"))  # the shown figure is never checked or returned

    def postfix() -> dict[str, str]:
        calls.append(1)
        return {"extra": "1"}

    batches = Batches(4, 2, torch.Generator().manual_seed(0), lambda idx: idx)
    mean = fit_loop(torch.optim.SGD([w], lr=0.1), batches, loss, 3, device=CPU, job="tiny fit", hint="lower lr",
                    show="figure", postfix=postfix)  # fmt: skip
    assert mean == 2.0
    assert len(calls) == 3  # once per epoch


def test_cuda_only_settings_are_chosen_by_device() -> None:
    params = [torch.nn.Parameter(torch.ones(3))]
    for kind in ("sgd", "adam", "adamw"):
        assert make_optimizer(kind, params, torch.device("cuda"), lr=0.1).defaults["fused"] is True
        assert make_optimizer(kind, params, CPU, lr=0.1).defaults["fused"] is None  # torch's default on the CPU
    images, labels, masks = torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    x, y, m = _channels_last((images, labels, masks))
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, images)
    assert y is labels and m is masks  # labels and non-float tensors keep their layout
    assert isinstance(_channels_last([images]), list)
