"""The shared parameter checks: the bounds they enforce and the one line they print."""

from __future__ import annotations

import pytest

from bench.core.errors import BenchError
from bench.core.params import require, require_between, require_count
from bench.core.registry import ATTACKS, DEFENSES


def test_require_names_the_plugin() -> None:
    require(True, "p", "never shown")
    with pytest.raises(BenchError, match=r"^p: lr must be > 0$"):
        require(False, "p", "lr must be > 0")


@pytest.mark.parametrize(
    ("minimum", "kind"), [(0, "a non-negative integer"), (1, "a positive integer"), (2, "an integer >= 2")]
)
def test_require_count_bounds_and_wording(minimum: int, kind: str) -> None:
    require_count("p", "n", minimum, minimum=minimum)
    for bad in (minimum - 1, float(minimum), str(minimum)):
        with pytest.raises(BenchError, match=rf"^p: n must be {kind}, got {bad!r}$"):
            require_count("p", "n", bad, minimum=minimum)


@pytest.mark.parametrize(
    ("bounds", "accepts_low", "accepts_high"), [("[]", True, True), ("[)", True, False), ("(]", False, True), ("()", False, False)]
)
def test_require_between_honours_each_bracket(bounds: str, accepts_low: bool, accepts_high: bool) -> None:
    require_between("p", "x", 0.5, 0, 1, bounds)
    for value, accepted in ((0, accepts_low), (1, accepts_high)):
        if accepted:
            require_between("p", "x", value, 0, 1, bounds)
        else:
            with pytest.raises(BenchError, match=rf"^p: x must be in \{bounds[0]}0, 1\{bounds[1]}, got {value}$"):
                require_between("p", "x", value, 0, 1, bounds)
    for outside in (-0.01, 1.01):
        with pytest.raises(BenchError):
            require_between("p", "x", outside, 0, 1, bounds)


def test_require_between_rejects_non_numbers_with_the_same_line() -> None:
    for bad in (True, "0.5", None, [0.5]):
        with pytest.raises(BenchError, match=r"^p: x must be in \(0, 1\), got"):
            require_between("p", "x", bad, 0, 1, "()")


def test_or_null_accepts_none_and_says_what_it_means() -> None:
    require_between("p", "rate", None, 0, 1, "()", or_null="the grid's rate")
    with pytest.raises(BenchError, match=r"^p: rate must be in \(0, 1\) or null \(the grid's rate\), got 1$"):
        require_between("p", "rate", 1, 0, 1, "()", or_null="the grid's rate")


def test_malformed_bounds_are_a_programming_error() -> None:
    with pytest.raises(ValueError):
        require_between("p", "x", 0.5, 0, 1, "[[")


@pytest.mark.parametrize(
    ("registry", "name", "params", "message"),
    [
        (DEFENSES, "refine", {"gamma": 0}, r"^refine: gamma must be in \(0, 1\], got 0$"),
        (DEFENSES, "refine", {"batch_size": 1}, r"^refine: batch_size must be an integer >= 2, got 1$"),
        (DEFENSES, "refine", {"benign_fraction": 1.0}, r"^refine: benign_fraction must be in \(0, 1\), got 1.0$"),
        (DEFENSES, "bdmae", {"refine_rounds": -1}, r"^bdmae: refine_rounds must be a non-negative integer, got -1$"),
        (DEFENSES, "btidbf_u", {"poison_share": 0}, r"^btidbf_u: poison_share must be in \(0, 1\], got 0$"),
        (ATTACKS, "label_consistent", {"poison_rate": 1}, r"^label_consistent: poison_rate must be in \(0, 1\) or null"),
        (ATTACKS, "adaptive_patch", {"cover_rate": 1}, r"^adaptive_patch: cover_rate must be in \[0, 1\), got 1$"),
        (ATTACKS, "wanet", {"grid_rescale": 0}, r"^wanet: grid_rescale must be in \(0, 1\], got 0$"),
    ],
)
def test_plugins_reject_impossible_values_in_one_line(registry, name: str, params: dict, message: str) -> None:
    with pytest.raises(BenchError, match=message):
        registry.get(name)(**params)


def test_plugins_accept_null_where_it_has_a_meaning() -> None:
    assert DEFENSES.get("bdmae")(benign_fraction=None).benign_fraction is None
    assert ATTACKS.get("label_consistent")(poison_rate=None).poison_rate is None
