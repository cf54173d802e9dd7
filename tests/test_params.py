"""Typed plugin parameters: validation lines, normalisation, cache-key identity, documentation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.core.errors import BenchError
from bench.core.files import stable_hash
from bench.core.params import PluginParams, param_docs
from bench.core.plugin import Plugin
from bench.core.registry import ATTACKS, DATASETS, DEFENSES, MODELS

REGISTRIES = {"attack": ATTACKS, "defense": DEFENSES, "model": MODELS, "dataset": DATASETS}
ALL_PLUGINS = [(kind, name) for kind, registry in REGISTRIES.items() for name in registry.names()]


@pytest.mark.parametrize(
    ("registry", "name", "params", "message"),
    [
        (DEFENSES, "shrinkpad", {"pad": -1}, r"^shrinkpad: pad must be >= 0, got -1$"),
        (DEFENSES, "shrinkpad", {"pad": 2.5}, r"^shrinkpad: pad must be an integer >= 0, got 2.5$"),
        (DEFENSES, "shrinkpad", {"pad": True}, r"^shrinkpad: pad must be an integer >= 0, got true$"),
        (DEFENSES, "shrinkpad", {"pad": "4"}, r"^shrinkpad: pad must be an integer >= 0, got '4'$"),
        (DEFENSES, "shrinkpad", {"padd": 4}, r"^shrinkpad: unknown parameter 'padd' \(did you mean 'pad'\?\); valid: pad$"),
        (DEFENSES, "refine", {"gamma": 0}, r"^refine: gamma must be in \(0, 1\], got 0$"),
        (DEFENSES, "refine", {"batch_size": 1}, r"^refine: batch_size must be >= 2, got 1$"),
        (DEFENSES, "refine", {"benign_fraction": 1.0}, r"^refine: benign_fraction must be in \(0, 1\), got 1$"),
        (DEFENSES, "refine", {"lr": float("nan")}, r"^refine: lr must be a finite number > 0, got nan$"),
        (DEFENSES, "refine", {"remap": 1}, r"^refine: remap must be true or false, got 1$"),
        (DEFENSES, "refine", {"optimizer": "rmsprop"}, r"^refine: optimizer must be one of 'sgd', 'adam', got 'rmsprop'$"),
        (DEFENSES, "refine", {"crop_scale": [0.9, 0.5]},
         r"^refine: crop_scale must be \[low, high\] with 0 < low <= high <= 1, got \[0.9, 0.5\]$"),
        (DEFENSES, "refine", {"milestones": [5, 0]}, r"^refine: milestones\[1\] must be an integer > 0, got 0$"),
        (DEFENSES, "bdmae", {"refine_rounds": -1}, r"^bdmae: refine_rounds must be >= 0, got -1$"),
        (DEFENSES, "bdmae", {"mae_train": {"epochs": 0}}, r"^bdmae: mae_train.epochs must be >= 1, got 0$"),
        (DEFENSES, "bdmae", {"mae_train": {"epoch": 3}}, r"^bdmae: unknown parameter 'mae_train.epoch' \(did you mean"),
        (DEFENSES, "bdmae", {"mae": {"patch": 4}}, r"^bdmae: mae must only hold MAEConfig settings .*unknown: patch"),
        (DEFENSES, "btidbf_u", {"poison_share": 0}, r"^btidbf_u: poison_share must be in \(0, 1\], got 0$"),
        (DEFENSES, "btidbf_u", {"mode": "purify"}, r"^btidbf_u: mode must be 'unlearn', got 'purify'$"),
        (ATTACKS, "label_consistent", {"poison_rate": 1}, r"^label_consistent: poison_rate must be in \(0, 1\), got 1$"),
        (ATTACKS, "adaptive_patch", {"cover_rate": 1}, r"^adaptive_patch: cover_rate must be in \[0, 1\), got 1$"),
        (ATTACKS, "adaptive_patch", {"alphas": []}, r"^adaptive_patch: alphas must be a non-empty list of numbers in"),
        (ATTACKS, "adaptive_patch", {"alphas": [0.5, 2]}, r"^adaptive_patch: alphas\[1\] must be a number in \(0, 1\], got 2$"),
        (ATTACKS, "wanet", {"grid_rescale": 0}, r"^wanet: grid_rescale must be in \(0, 1\], got 0$"),
        (ATTACKS, "badnets", {"position": "middle"}, r"^badnets: position must be one of 'bottom_right', .* or a pair of integers, got 'middle'$"),
        (ATTACKS, "batt", {"angle": 0}, r"^batt: angle must be a non-zero number of degrees in \(-180, 180\], got 0$"),
        (ATTACKS, "physical_ba", {"scale": [0.9, 0.8]}, r"^physical_ba: scale must be \[low, high\] with 0 < low <= high"),
        (MODELS, "small_cnn", {"widht": 8},
         r"^small_cnn: unknown parameter 'widht' \(did you mean 'width'\?\); valid: normalization, width$"),
        (MODELS, "cifar_resnet18", {"width": 8}, r"^cifar_resnet18: unknown parameter 'width'; valid: normalization$"),
        (MODELS, "cifar_resnet18", {"normalization": {"mean": [0.5], "std": [0]}},
         r"^cifar_resnet18: normalization.std\[0\] must be a number > 0, got 0$"),
        (ATTACKS, "badnets", {"pattern": [[1, 2], [3, 256]]}, r"^badnets: pattern must be one of 'white', 'random' or a list"),
        (ATTACKS, "badnets", {"pattern": [[1, 2], [3]]}, r"^badnets: pattern must be a square of pixel values"),
        (ATTACKS, "badnets", {"pattern": [[1, 2], [3, 4]], "size": 3}, r"^badnets: size 3 differs from the side"),
        (DATASETS, "mnist5k", {"train_size": 5000}, r"^mnist5k: train_size must be in \(0, 5000\), got 5000$"),
        (DATASETS, "imagefolder", {"mode": "CMYK"}, r"^imagefolder: mode must be one of 'RGB', 'L', got 'CMYK'$"),
    ],
)
def test_bad_values_give_one_line_naming_plugin_parameter_rule_and_value(registry, name, params, message) -> None:
    with pytest.raises(BenchError, match=message) as err:
        registry.create(name, params)
    assert "\n" not in str(err.value)


def test_integral_floats_are_integers_and_give_the_same_cache_key() -> None:
    as_int, as_float = DEFENSES.create("shrinkpad", {"pad": 4}), DEFENSES.create("shrinkpad", {"pad": 4.0})
    assert as_float.params.pad == 4 and isinstance(as_float.params.pad, int)
    assert stable_hash(as_int.identity()) == stable_hash(as_float.identity())
    assert stable_hash(as_int.identity()) != stable_hash(DEFENSES.create("shrinkpad", {"pad": 2}).identity())
    # float fields take integers as the same number
    assert ATTACKS.create("blended", {"alpha": 1}).identity() == ATTACKS.create("blended", {"alpha": 1.0}).identity()


def test_the_key_holds_only_declared_parameters_and_the_code_version(monkeypatch) -> None:
    shrinkpad = DEFENSES.create("shrinkpad", {"pad": 4})
    assert shrinkpad.describe() == {"pad": 4}  # no base-class plumbing (benign_fraction, device, ...)
    assert shrinkpad.identity() == {"name": "shrinkpad", "version": 1, "params": {"pad": 4}}
    before = stable_hash(shrinkpad.identity())
    monkeypatch.setattr(type(shrinkpad), "version", 2)
    assert stable_hash(shrinkpad.identity()) != before  # a code change invalidates this plugin's artifacts


def test_null_is_accepted_where_it_has_a_meaning() -> None:
    assert DEFENSES.create("bdmae", {"benign_fraction": None}).benign_fraction is None
    assert ATTACKS.create("label_consistent", {"poison_rate": None}).params.poison_rate is None
    with pytest.raises(BenchError, match="^refine: benign_fraction must be a number in \\(0, 1\\), got null$"):
        DEFENSES.create("refine", {"benign_fraction": None})


def test_missing_files_are_parameter_errors(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="^blended: pattern must be 'noise' or an existing image file, got '.*cat.png'$"):
        ATTACKS.create("blended", {"pattern": str(tmp_path / "cat.png")})
    with pytest.raises(BenchError, match="^bdmae: mae_weights must be an existing MAE weights file or null"):
        DEFENSES.create("bdmae", {"mae_weights": str(tmp_path / "mae.pth")})


@pytest.mark.parametrize(("kind", "name"), ALL_PLUGINS)
def test_every_plugin_declares_documented_typed_parameters(kind: str, name: str) -> None:
    cls = REGISTRIES[kind].get(name)
    assert issubclass(cls, Plugin) and issubclass(cls.Params, PluginParams)
    assert isinstance(cls.version, int) and cls.version >= 1 and cls.name == name
    assert cls.Params.model_config.get("extra") == "forbid" and cls.Params.model_config.get("allow_inf_nan") is False
    for row in param_docs(cls.Params):
        assert row.description and "\n" not in row.description, f"{name}.{row.name} has no one-line description"
    defaults = cls.parse_params({})
    identity = cls.identity_of(defaults)
    stable_hash(identity)  # plain JSON
    assert set(identity["params"]) == set(cls.Params.model_fields)
    with pytest.raises(BenchError, match=rf"^{name}: unknown parameter 'no_such_parameter'"):
        cls.parse_params({"no_such_parameter": 1})


def test_param_docs_give_type_default_constraint_and_description() -> None:
    rows = {row.name: row for row in param_docs(DEFENSES.get("refine").Params)}
    assert (rows["gamma"].type, rows["gamma"].default, rows["gamma"].constraint) == ("float", "0.8", "in (0, 1]")
    assert rows["width"].type == "int | null" and rows["width"].default == "null" and rows["width"].constraint == ">= 1"
    assert rows["optimizer"].type == "'sgd' | 'adam'"
    assert rows["milestones"].constraint == "each > 0"
    bdmae = {row.name: row for row in param_docs(DEFENSES.get("bdmae").Params)}
    assert bdmae["mae_train.epochs"].default == "200" and bdmae["mae_train.epochs"].constraint == ">= 1"


def test_stable_hash_refuses_what_is_not_plain_json() -> None:
    assert stable_hash({"b": [1, 2.5, None, True], "a": "x"}) == stable_hash({"a": "x", "b": [1, 2.5, None, True]})
    for bad in ({"p": Path("x")}, {"p": {1, 2}}, {1: "int key"}, {"x": math.nan}, {"x": math.inf}, object()):
        with pytest.raises(TypeError, match="stable_hash"):
            stable_hash(bad)
    json.dumps(DEFENSES.create("bdmae").identity())
