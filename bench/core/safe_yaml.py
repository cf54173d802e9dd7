"""YAML that cannot blow up: PyYAML's safe loader with alias expansion bounded.

Anchors and merge keys are welcome in grid files, but a few hundred bytes of nested aliases
("billion laughs") expand into billions of values once something walks the document. Every YAML
the harness reads -- grid files, ``--set`` values, a run directory's ``config.yaml`` snapshot --
goes through :func:`safe_load_bounded`, so a tampered or hostile file costs a clear error, not
the machine's memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# Far above any real grid (hundreds of values), far below what exhausts memory downstream.
MAX_YAML_NODES = 100_000


class YamlTooLarge(yaml.YAMLError):
    """The composed document, with its aliases expanded, is too large or recursive."""


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """How many values ``node`` stands for once every alias in it is expanded (memoised per node,
    so the count itself stays cheap however often a node is aliased)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise YamlTooLarge("an alias refers to a collection that contains it (a recursive alias)")
    active.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, memo, active)
        if total > MAX_YAML_NODES:
            raise YamlTooLarge(f"its aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?)")
    active.discard(key)
    memo[key] = total
    return total


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses documents whose aliases expand beyond :data:`MAX_YAML_NODES`."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {}, set())
        return node


def safe_load_bounded(text: str) -> Any:
    """``yaml.safe_load`` with alias expansion bounded (see :class:`BoundedLoader`)."""
    return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 - a SafeLoader subclass


def run_config_snapshot(run_dir: Path) -> dict[str, Any]:
    """The run directory's ``config.yaml`` as a mapping; empty when it is missing, unreadable,
    not a mapping or too large (the report then falls back to its defaults)."""
    try:
        raw = safe_load_bounded((Path(run_dir) / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, dict) else {}
