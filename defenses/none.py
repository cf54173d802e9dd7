"""No defense: the backdoored model as it is, the reference row of every table."""

from __future__ import annotations

from bench.core.registry import DEFENSES
from defenses.base import Defense


@DEFENSES.register("none")
class NoDefense(Defense):
    """The undefended (backdoored) model."""
