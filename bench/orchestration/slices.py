"""``run --only attacks=badnets,wanet``: a slice of a grid, its entries exactly as the grid file has them.

A grid too big for one sitting runs in slices (then ``table SLICE ... --out DIR`` merges them). A
slice could be written with ``--set 'attacks=[...]'``, but that replaces the entries and so their
reference parameters (``{name: wanet, k: 32}`` would have to be typed again, and a bare
``wanet`` silently runs other settings). ``--only`` keeps the grid file's entries whose name or
label is listed, in the file's order, so every slice is a true part of the same experiment.
"""

from __future__ import annotations

from bench.core.errors import BenchError
from bench.orchestration.config import GridConfig

SLICEABLE = ("datasets", "models", "attacks", "defenses", "seeds")


def _names(entry: object) -> set[str]:
    """What selects an entry: a seed by its value, a plugin entry by its name or its label."""
    if isinstance(entry, int):
        return {str(entry)}
    return {entry.name, entry.display()}  # type: ignore[attr-defined]


def select_entries(config: GridConfig, selections: list[str] | None) -> GridConfig:
    """The grid restricted by ``KEY=NAME[,NAME...]`` items (``--only``); one error line for a key
    that is not a grid list or a name that selects nothing."""
    for item in selections or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        wanted = [name.strip() for name in raw.split(",") if name.strip()]
        if not sep or key not in SLICEABLE or not wanted:
            raise BenchError(f"--only expects KEY=NAME[,NAME...] with KEY one of {', '.join(SLICEABLE)}, "
                             f"got {item!r}")  # fmt: skip
        entries = list(getattr(config, key))
        for name in wanted:
            if not any(name in _names(entry) for entry in entries):
                listed = ", ".join(sorted({n for entry in entries for n in _names(entry)}))
                raise BenchError(f"--only {key}: no entry is called {name!r}; the grid's {key}: {listed}")
        kept = [entry for entry in entries if _names(entry) & set(wanted)]
        config = config.model_copy(update={key: kept})
    return config
