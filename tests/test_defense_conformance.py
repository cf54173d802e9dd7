"""The defense contract, checked for every registered defense (a new defense is checked automatically).

Each defense is fitted on a small class-balanced sample of real data (MNIST: 1 channel, 28 px;
CIFAR-10: 3 channels, 32 px) around an untrained small CNN -- the checks are about the contract,
not about how well the defense works:

- fit and predict leave the frozen model's weights (and buffers) untouched;
- ``predict`` returns float logits of shape (N, K) for float batches made from uint8 images;
- ``state()`` survives the cache (torch-serialised, loaded with ``weights_only``) and
  ``load_state`` restores identical predictions and the same (plain JSON) ``findings()``;
- the same seed gives the same state and the same predictions;
- bad parameters give one :class:`BenchError` line naming the defense and the parameter.

Defenses whose defaults are slow get tiny settings below; any other (third-party) defense runs
with its defaults. The checks are plain functions, so a test can also show that they catch a
defense that breaks the contract.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import sample, small_split
from torch import Tensor, nn

from bench.core.data import DataSplit, ImageSet
from bench.core.device import to_float
from bench.core.errors import BenchError
from bench.core.models import build_model
from bench.core.params import admitted_types, bounds_of
from bench.core.registry import DEFENSES
from defenses.base import Defense, DefenseContext

NAMES = DEFENSES.names()
CPU = torch.device("cpu")
N_BENIGN = 96
N_TEST = 12
SEED = 3

TINY_MAE = {"embed_dim": 16, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
            "decoder_num_heads": 2}  # fmt: skip
TINY_BTIDBF = {"generator_base": 4, "generator_depth": 2, "batch_size": 48, "pretrain_epochs": 1, "mask_epochs": 1,
               "invert_epochs": 1, "rounds": 1, "defend_epochs": 1, "crop_padding": 2}  # fmt: skip
FAST_PARAMS: dict[str, dict[str, Any]] = {
    "refine": {"width": 4, "epochs": 1, "batch_size": 32, "milestones": [1]},
    "bdmae": {"init_rounds": 1, "init_masks": 2, "refine_rounds": 1, "num_thresholds": 2, "mae": TINY_MAE,
              "mae_train": {"epochs": 1, "batch_size": 48, "warmup_epochs": 0}},
    "btidbf": TINY_BTIDBF,
    "btidbf_u": TINY_BTIDBF,
    "btidbf_p": TINY_BTIDBF,
}  # fmt: skip


def params_for(name: str) -> dict[str, Any]:
    return FAST_PARAMS.get(name, {})


# --------------------------------------------------------------------------- the checks


def state_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer of a model (names, shapes and bytes)."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fitted(name: str, params: dict[str, Any], model: nn.Module, benign: ImageSet, seed: int = SEED,
           ctx: DefenseContext | None = None) -> Defense:  # fmt: skip
    """Create, bind and (for trainable defenses) fit a defense the way the grid runner does."""
    defense: Defense = DEFENSES.create(name, params)
    defense.bind(model, CPU, seed, ctx or DefenseContext())
    if defense.trainable:
        defense.fit(benign, torch.Generator().manual_seed(seed))
    return defense


def check_frozen_model_untouched(name: str, params: dict[str, Any], model: nn.Module, benign: ImageSet,
                                 x: Tensor) -> Defense:  # fmt: skip
    """fit, predict and state() must not change the frozen model's weights or buffers."""
    before = state_digest(model)
    defense = fitted(name, params, model, benign)
    with torch.no_grad():
        defense.predict(x)
    defense.state()
    assert state_digest(model) == before, f"{name}: fit/predict changed the frozen model"
    return defense


def check_predict_logits(defense: Defense, x: Tensor, num_classes: int) -> None:
    """predict returns finite float logits (N, K) on a float batch in [0, 1]."""
    with torch.no_grad():
        out = defense.predict(x)
    assert out.shape == (x.shape[0], num_classes), f"{defense.name}: logits of shape {tuple(out.shape)}"
    assert out.dtype.is_floating_point and bool(torch.isfinite(out).all())


def through_the_cache(state: dict[str, Any]) -> dict[str, Any]:
    """What the artifact cache gives back: torch-serialised, loaded with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


def check_state_round_trip(name: str, params: dict[str, Any], model: nn.Module, benign: ImageSet, x: Tensor) -> None:
    """A fresh defense loaded from ``state()`` predicts exactly as the fitted one (both bound to the
    same seed, so random test-time streams agree)."""
    ctx = DefenseContext()
    original = fitted(name, params, model, benign, ctx=ctx)
    state = through_the_cache(original.state())
    original.bind(model, CPU, SEED, ctx)  # restart the random streams; the fitted state stays
    restored: Defense = DEFENSES.create(name, params)
    restored.bind(model, CPU, SEED, ctx)
    restored.load_state(state)
    with torch.no_grad():
        assert torch.equal(original.predict(x), restored.predict(x)), f"{name}: load_state changed the predictions"
    findings = original.findings()
    assert json.loads(json.dumps(findings)) == findings, f"{name}: findings() is not plain JSON"
    assert restored.findings() == findings, f"{name}: load_state changed the findings"


def assert_same_state(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where} keys differ"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    else:
        assert a == b, f"{where} differs: {a!r} != {b!r}"


def check_same_seed_same_state(name: str, params: dict[str, Any], model: nn.Module, benign: ImageSet, x: Tensor) -> None:
    """Two fits with the same seed give the same state and the same predictions."""
    a = fitted(name, params, model, benign)
    b = fitted(name, params, model, benign)
    assert_same_state(a.state(), b.state())
    a.bind(model, CPU, SEED, a.ctx)
    b.bind(model, CPU, SEED, b.ctx)
    with torch.no_grad():
        assert torch.equal(a.predict(x), b.predict(x)), f"{name}: same seed, different predictions"


def out_of_range(field: Any) -> Any | None:
    """A value just outside a numeric field's declared bounds (None when it has none)."""
    bounds = bounds_of(field.metadata)
    if "ge" in bounds:
        return bounds["ge"] - 1
    if "gt" in bounds:
        return bounds["gt"]
    if "le" in bounds:
        return bounds["le"] + 1
    if "lt" in bounds:
        return bounds["lt"]
    return None


def check_bad_parameters(name: str) -> None:
    """An unknown parameter, an out-of-range value and a wrong type each give one BenchError line."""
    cls = DEFENSES.get(name)
    cases = [({"no_such_parameter": 1}, "no_such_parameter")]
    for field_name, field in cls.Params.model_fields.items():
        value = out_of_range(field)
        if value is not None:
            cases.append(({field_name: value}, field_name))
        admitted = admitted_types(field.annotation)
        if admitted & {int, float} and str not in admitted:
            cases.append(({field_name: "many"}, field_name))
    for params, mentioned in cases:
        with pytest.raises(BenchError) as err:
            DEFENSES.create(name, params)
        line = str(err.value)
        assert "\n" not in line and line.startswith(f"{name}: ") and mentioned in line, line


# --------------------------------------------------------------------------- data and models


@pytest.fixture(scope="module", params=["mnist", "cifar10"])
def data(request: pytest.FixtureRequest) -> DataSplit:
    return small_split(request, N_BENIGN, N_TEST)


def untrained_model(data: DataSplit) -> nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", data.train.num_classes, data.train.x.shape[1], width=4).eval()


def float_batch(data: DataSplit) -> Tensor:
    return to_float(data.test.x)


# --------------------------------------------------------------------------- every registered defense


@pytest.mark.parametrize("name", NAMES)
def test_fit_and_predict_leave_the_model_alone_and_return_logits(name: str, data: DataSplit) -> None:
    model, x = untrained_model(data), float_batch(data)
    defense = check_frozen_model_untouched(name, params_for(name), model, data.train, x)
    check_predict_logits(defense, x, data.train.num_classes)


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_to_identical_predictions(name: str, data: DataSplit) -> None:
    check_state_round_trip(name, params_for(name), untrained_model(data), data.train, float_batch(data))


@pytest.mark.parametrize("name", NAMES)
def test_the_same_seed_gives_the_same_state(name: str, data: DataSplit) -> None:
    check_same_seed_same_state(name, params_for(name), untrained_model(data), data.train, float_batch(data))


@pytest.mark.parametrize("name", NAMES)
def test_bad_parameters_give_one_line(name: str) -> None:
    check_bad_parameters(name)


# --------------------------------------------------------------------------- the checks catch a broken defense


class NudgesTheFrozenModel(Defense):
    """Test-only: a trainable defense that (wrongly) updates the frozen model's weights in fit."""

    trainable = True

    def fit(self, benign: ImageSet, gen: torch.Generator) -> None:
        with torch.no_grad():
            next(self.classifier.parameters()).add_(1e-3)


@pytest.fixture
def broken_defense() -> Callable[[], None]:
    DEFENSES.register("nudges_the_frozen_model")(NudgesTheFrozenModel)
    yield
    DEFENSES.unregister("nudges_the_frozen_model")


def test_the_conformance_check_fails_for_a_defense_that_updates_the_frozen_model(broken_defense, mnist) -> None:
    data = DataSplit(mnist.name, sample(mnist.train, N_BENIGN), sample(mnist.test, N_TEST))
    with pytest.raises(AssertionError, match="nudges_the_frozen_model: fit/predict changed the frozen model"):
        check_frozen_model_untouched("nudges_the_frozen_model", {}, untrained_model(data), data.train, float_batch(data))
    check_bad_parameters("nudges_the_frozen_model")  # its (empty) parameters are still checked
