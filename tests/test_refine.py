"""REFINE end to end on real MNIST digits: label-free fitting, prediction, cached state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.core.data import DataPaths, DataSplit, ImageSet
from bench.core.device import to_float
from bench.core.errors import BenchError
from bench.core.models import build_model
from bench.nn.train import TrainRecipe, train_classifier
from bench.orchestration.config import GridConfig
from bench.orchestration.grid import compile_grid
from bench.orchestration.runner import CellRunner
from bench.orchestration.store import ArtifactStore
from defenses.refine import Refine, milestones_for

CPU = torch.device("cpu")
TINY = {"width": 4, "epochs": 1, "batch_size": 32}


def fitted(model: torch.nn.Module, benign: ImageSet, seed: int = 0, **params) -> Refine:
    defense = Refine(**{**TINY, **params})
    defense.bind(model, CPU, seed)
    defense.fit(benign, torch.Generator().manual_seed(seed))
    return defense


def same_state(a: dict, b: dict) -> bool:
    return (a.keys() == b.keys() and torch.equal(a["permutation"], b["permutation"])
            and all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"]))  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from a second thread, and on a shared CPU it costs many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits(mnist: DataSplit) -> ImageSet:
    return mnist.train.subset(torch.arange(2000, 2128))


@pytest.fixture(scope="module")
def digit_model(mnist: DataSplit) -> torch.nn.Module:
    """A small CNN trained briefly on the MNIST digits: predictions that depend on the input."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, width=8)
    recipe = TrainRecipe(epochs=2, batch_size=50, lr=0.05, schedule="onecycle", crop_padding=0, flip=False)
    return train_classifier(model, mnist.train.x[:2000], mnist.train.y[:2000], recipe, CPU, seed=0)


def test_benign_labels_are_never_read(digit_model, digits: ImageSet) -> None:
    garbage = ImageSet(digits.x, torch.randint(-1000, 1000, (len(digits),)), digits.classes)
    honest = fitted(digit_model, digits).state()
    assert same_state(honest, fitted(digit_model, garbage).state())
    assert not same_state(honest, fitted(digit_model, digits, seed=1).state())  # the check can fail


def test_prediction_is_pi_of_the_models_argmax_on_the_transformed_input(digit_model, digits: ImageSet) -> None:
    defense = fitted(digit_model, digits)
    x = to_float(digits.x[:32])
    with torch.no_grad():
        transformed = defense.transform(x)
        raw = digit_model(transformed).argmax(1)
        assert transformed.min() >= 0 and transformed.max() <= 1 and transformed.shape == x.shape
        assert torch.equal(defense.predict(x).argmax(1), defense.permutation[raw])
        assert torch.equal(defense.features(x), digit_model.features(transformed))
        logits, features = defense.predict_with_features(x)  # the evaluation's path: the mapping included
        assert torch.equal(logits, defense.predict(x)) and torch.equal(features, digit_model.features(transformed))
    assert not (defense.permutation == torch.arange(10)).any()


def test_remap_false_predicts_the_models_own_label(digit_model, digits: ImageSet) -> None:
    defense = fitted(digit_model, digits, remap=False)
    x = to_float(digits.x[:32])
    with torch.no_grad():
        assert torch.equal(defense.predict(x), digit_model(defense.transform(x)))


def test_state_round_trips_through_the_artifact_store(digit_model, digits: ImageSet, tmp_path: Path) -> None:
    defense = fitted(digit_model, digits)
    store = ArtifactStore(tmp_path)
    store.save("defenses", "key", defense.state())
    restored = Refine(**TINY)
    restored.bind(digit_model, CPU, 0)
    restored.load_state(store.load("defenses", "key"))
    assert same_state(defense.state(), restored.state())
    x = to_float(digits.x[:16])
    with torch.no_grad():
        assert torch.equal(defense.predict(x), restored.predict(x))


def test_the_default_width_is_the_papers_choice_for_the_image_size() -> None:
    """c = 64 on 32-px CIFAR-10, 32 on 224-px ImageNet; an explicit width always wins."""
    assert Refine().unet_width(32) == 64
    assert Refine().unet_width(28) == 64
    assert Refine().unet_width(224) == 32
    assert Refine(width=8).unet_width(224) == 8


def test_a_default_width_fit_builds_and_reloads_that_width(digit_model, digits: ImageSet) -> None:
    defense = fitted(digit_model, digits.subset(torch.arange(32)), width=None)
    assert defense._unet.stem[0].out_channels == 64
    restored = Refine(width=None)
    restored.bind(digit_model, CPU, 0)
    restored.load_state(defense.state())
    assert same_state(defense.state(), restored.state())


def test_a_state_loads_with_the_width_its_weights_have(digit_model, digits: ImageSet) -> None:
    state = fitted(digit_model, digits).state()  # width 4
    restored = Refine(width=None)  # would build 64 on these digits
    restored.bind(digit_model, CPU, 0)
    restored.load_state(state)
    reloaded = restored.state()["unet"]
    assert reloaded.keys() == state["unet"].keys()
    assert all(torch.equal(reloaded[k], v) for k, v in state["unet"].items())


def test_the_runner_caches_the_fitted_state(mnist: DataSplit, tmp_path: Path, monkeypatch) -> None:
    config = GridConfig.model_validate({
        "datasets": ["mnist5k"], "models": [{"name": "small_cnn", "width": 4}], "attacks": ["badnets"],
        "defenses": [{"name": "refine", **TINY, "benign_fraction": 0.05}], "holdout": 0.2,
    })  # fmt: skip
    (cell,) = compile_grid(config)
    runner = CellRunner(config, DataPaths(Path("unused"), tmp_path), ArtifactStore(tmp_path), CPU)
    runner._datasets[cell.dataset.model_dump_json(exclude={"label"})] = mnist
    data = runner.cell_data(cell)
    model = build_model("small_cnn", 10, 1, width=4)
    first, cached = runner.defense(cell, data, model)
    assert not cached
    assert len(runner.benign_subset(cell, data, first)) == round(0.05 * len(mnist.train))

    def no_refit(*_args, **_kwargs):
        raise AssertionError("a cached REFINE state must not be fitted again")

    monkeypatch.setattr(Refine, "fit", no_refit)
    second, cached = runner.defense(cell, data, model)
    assert cached and same_state(first.state(), second.state())


def test_fitting_learns_to_undo_the_mapping(digit_model, mnist: DataSplit) -> None:
    """Trained on 64 digits, pi(f(T(x))) recovers f(x) on them far more often than an untrained T."""
    benign = mnist.train.subset(torch.arange(2000, 2064))
    x = to_float(benign.x)
    no_augment = {"crop_scale": [1.0, 1.0], "flip": False, "grayscale": 0.0}
    trained = fitted(digit_model, benign, width=4, epochs=30, batch_size=32, **no_augment)
    untrained = Refine(width=4)
    untrained.bind(digit_model, CPU, 0)
    untrained.load_state({**trained.state(), "unet": untrained._build_unet(1, 4).state_dict()})

    def agreement(defense: Refine) -> float:
        with torch.no_grad():
            return (defense.predict(x).argmax(1) == digit_model(x).argmax(1)).float().mean().item()

    assert agreement(trained) > agreement(untrained) + 0.2


@pytest.mark.parametrize(
    "params, message",
    [
        ({"width": 0}, "width"),
        ({"epochs": 0}, "epochs"),
        ({"supcon_weight": -1}, "supcon_weight"),
        ({"remap": "no"}, "remap"),
        ({"classification_loss": "mse"}, "classification_loss"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"crop_scale": [0.9, 0.8]}, "crop_scale"),
        ({"benign_fraction": 1.5}, "benign_fraction"),
        ({"colour": 1}, "unknown parameter 'colour'"),
    ],
)
def test_bad_parameters_raise_one_clear_error(params: dict, message: str) -> None:
    with pytest.raises(BenchError, match=message):
        Refine(**params)


def test_predict_before_fit_is_a_clear_error(digit_model) -> None:
    defense = Refine()
    defense.bind(digit_model, CPU, 0)
    with pytest.raises(BenchError, match="fit"):
        defense.predict(torch.rand(2, 1, 28, 28))


def test_public_code_variants_train_too(digit_model, digits: ImageSet) -> None:
    """BCE on the remapped softmax (the public code's loss) with Adam gives a finite fit that moves T."""
    defense = fitted(digit_model, digits, classification_loss="bce", optimizer="adam", lr=1e-3)
    assert torch.isfinite(torch.tensor(defense._fit_loss))
    initial = defense._build_unet(1, 4).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in defense.state()["unet"].items())


def test_io_space_normalized_keeps_every_pixel_between_mean_and_mean_plus_std(digit_model, digits: ImageSet) -> None:
    """The public code reads T's clamped output as a normalised image: in pixels, [mean, mean + std]."""
    mean, std = digit_model.normalize.mean, digit_model.normalize.std
    x = to_float(digits.x[:32])
    normalized = fitted(digit_model, digits, io_space="normalized")
    with torch.no_grad():
        out = normalized.transform(x)
        raw = normalized._unet((x - mean) / std)  # T sees the normalised image
        assert torch.allclose(out, mean + std * raw.clamp(0, 1))
        assert out.min() >= (mean - 1e-6).min() and out.max() <= (mean + std + 1e-6).max()
        assert torch.isclose(out.min(), mean.min())  # the clamp's lower edge lands on the mean
        assert torch.equal(normalized.predict(x).argmax(1), normalized.permutation[digit_model(out).argmax(1)])


def test_io_space_normalized_needs_the_models_statistics() -> None:
    defense = Refine(io_space="normalized")
    with pytest.raises(BenchError, match="io_space: normalized needs"):
        defense.bind(torch.nn.Linear(2, 2), CPU, 0)


@pytest.mark.parametrize("epochs,want", [(150, [100, 130]), (200, [150, 180]), (60, [10, 40]), (50, [30]),
                                         (21, [1]), (20, []), (1, [])])  # fmt: skip
def test_default_milestones_follow_the_public_rule_and_drop_non_positive_ones(epochs: int, want: list[int]) -> None:
    assert milestones_for(epochs) == want
    assert milestones_for(epochs, [3, 7]) == [3, 7]  # explicit milestones always win


def test_a_fit_decays_the_lr_at_the_default_milestones(digit_model, digits: ImageSet, monkeypatch) -> None:
    """60 epochs: decays after epochs 10 and 40 (here in steps: 4 images a batch, 1 step an epoch)."""
    seen: list[list[int]] = []
    real = torch.optim.lr_scheduler.MultiStepLR.__init__

    def spy(self, optimizer, milestones, *args, **kwargs):
        seen.append(sorted(milestones))
        real(self, optimizer, milestones, *args, **kwargs)

    monkeypatch.setattr(torch.optim.lr_scheduler.MultiStepLR, "__init__", spy)
    fitted(digit_model, digits.subset(torch.arange(4)), epochs=60, batch_size=4)
    assert seen == [[10, 40]]


class _Constant(torch.nn.Module):
    """Stands in for a U-Net whose output left [0, 1] (or, with value 0.5, one that did not)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("value,warns", [(-3.0, True), (4.0, True), (0.5, False)])
def test_a_fit_whose_output_left_the_pixel_range_is_named(value: float, warns: bool, capsys) -> None:
    defense = Refine(width=4, epochs=1)
    defense._unet = _Constant(value)
    defense._warn_if_saturated(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
    err = capsys.readouterr().err
    assert ("0.0% of the U-Net's output pixels lie inside [0, 1]" in err) is warns


@pytest.mark.parametrize("value", [-2.0, 0.3, 5.0])
def test_the_two_io_spaces_map_the_same_output_to_different_pixels(digit_model, value: float) -> None:
    """An output clamped to 0 or 1 is pixel 0 or 1 in the paper's pixel space, mean or mean + std in
    the public code's normalised one; values inside [0, 1] are scaled into the band."""
    mean, std = float(digit_model.normalize.mean), float(digit_model.normalize.std)
    clamped = min(max(value, 0.0), 1.0)
    for io_space, want in (("pixel", clamped), ("normalized", mean + std * clamped)):
        defense = Refine(width=4, io_space=io_space)
        defense.bind(digit_model, CPU, 0)
        defense._unet = _Constant(value)
        out = defense.transform(torch.rand(2, 1, 8, 8))
        assert torch.allclose(out, torch.full_like(out, want))
