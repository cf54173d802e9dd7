"""Checks of plugin parameters, shared so that an impossible value reads the same in every plugin.

Attacks and defenses validate their parameters in ``__init__``, before any data is loaded, so a
bad config fails in a second with one line naming the plugin, the parameter, the allowed values
and the value given -- e.g. ``refine: lr must be > 0, got -1``. These helpers build that line and
raise :class:`~bench.core.errors.BenchError` (exit status 2, no traceback).
"""

from __future__ import annotations

from typing import Any

from bench.core.errors import BenchError

_LOW_BRACKETS = {"[": float.__le__, "(": float.__lt__}
_HIGH_BRACKETS = {"]": float.__le__, ")": float.__lt__}


def require(ok: bool, plugin: str, message: str) -> None:
    """Raise ``BenchError("<plugin>: <message>")`` unless ``ok``."""
    if not ok:
        raise BenchError(f"{plugin}: {message}")


def require_count(plugin: str, name: str, value: Any, minimum: int = 1) -> None:
    """``value`` must be an integer >= ``minimum`` (epochs, widths, batch sizes, rounds)."""
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    require(isinstance(value, int) and value >= minimum, plugin, f"{name} must be {kind}, got {value!r}")


def require_between(
    plugin: str,
    name: str,
    value: Any,
    low: float,
    high: float,
    bounds: str = "[]",
    or_null: str | None = None,
) -> None:
    """``value`` must lie in the interval written ``bounds[0] low, high bounds[1]`` (e.g. ``"(]"``).

    ``or_null`` also accepts ``None`` and says what it stands for in the message (``"the grid's
    rate"``), for parameters whose default is taken from elsewhere.
    """
    if len(bounds) != 2 or bounds[0] not in _LOW_BRACKETS or bounds[1] not in _HIGH_BRACKETS:
        raise ValueError(f"bounds must be two brackets such as '[)', got {bounds!r}")
    if value is None and or_null is not None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and _LOW_BRACKETS[bounds[0]](float(low), float(value)) and _HIGH_BRACKETS[bounds[1]](float(value), float(high))
    suffix = f" or null ({or_null})" if or_null is not None else ""
    require(ok, plugin, f"{name} must be in {bounds[0]}{low}, {high}{bounds[1]}{suffix}, got {value}")
