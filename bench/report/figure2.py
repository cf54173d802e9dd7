"""The REFINE paper's Figure 2 from a run directory: a transformation defense's trade-off, composed.

For every defense swept over its intensity knob (ShrinkPad's ``pad``, BDMAE's ``max_restore``),
one figure, ``figures/figure2_<defense>.png``: a row per attack with the BA/ASR trade-off curve
against the intensity beside t-SNE panels of the penultimate features at no defense, a low and a
high intensity. It shows the paper's argument in one picture: the intensity that scatters the
poisoned cluster back to its true classes is the one that costs benign accuracy.

Low and high default to the smallest swept non-zero and the largest swept value; the grid's
``report.figure2`` block picks others per defense name (``{shrinkpad: {low: 2, high: 8}}``,
validated against the grid when it compiles). Like the t-SNE figures, everything comes from the
records and the saved features of the first seed: no model, data or cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bench.core.records import RecordStore
from bench.core.safe_yaml import run_config_snapshot
from bench.report.plots import (
    FIGURE_DIR,
    draw_tradeoff,
    other_params,
    save_figure,
    slug,
    themed,
    tick_label,
    tradeoff_groups,
)
from bench.report.tsne import (
    EmbeddingMemo,
    Panel,
    PanelResult,
    configured_sample,
    draw_panel,
    embed_panels,
    legend_handles,
    newer_than,
    panel_features,
    reuse_saved_embeddings,
)

PREFIX = "figure2_"


@dataclass
class Figure2Row:
    """One attack of a Figure 2: its trade-off curve and its three t-SNE panels."""

    group: dict[str, Any]  # a :func:`bench.report.plots.tradeoff_groups` entry
    panels: list[Panel]  # no defense, low, high
    seed: int


@dataclass
class Figure2:
    stem: Path
    title: str
    rows: list[Figure2Row]

    def files(self) -> list[Path]:
        return [self.stem.with_suffix(".png"), self.stem.with_suffix(".pdf")]


def configured_choices(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``report.figure2`` of the run's ``config.yaml`` (defense -> {low, high}); empty when absent."""
    choices = (run_config_snapshot(run_dir).get("report") or {}).get("figure2") or {}
    return {str(k): v for k, v in choices.items() if isinstance(v, dict)} if isinstance(choices, dict) else {}


def _at(records: list[dict[str, Any]], value: float) -> dict[str, Any] | None:
    return next((r for r in records if float(r["intensity"]) == float(value)), None)


def pick_intensities(records: list[dict[str, Any]], choice: dict[str, Any]) -> list[dict[str, Any]]:
    """The low and the high intensity cells of one curve (distinct, low first): the configured
    values, else the smallest non-zero and the largest intensity."""
    ranked = sorted(records, key=lambda r: float(r["intensity"]))
    nonzero = [r for r in ranked if float(r["intensity"]) != 0] or ranked
    low = _at(ranked, choice["low"]) if choice.get("low") is not None else nonzero[0]
    high = _at(ranked, choice["high"]) if choice.get("high") is not None else ranked[-1]
    picked = [r for r in (low, high) if r is not None]
    return [r for i, r in enumerate(picked) if all(r["cell_id"] != p["cell_id"] for p in picked[:i])]


def figure_plan(run_dir: Path, records: Iterable[dict[str, Any]],
                choices: dict[str, dict[str, Any]] | None = None) -> list[Figure2]:  # fmt: skip
    """One figure per swept defense curve (per dataset and model when the run has several)."""
    from bench.report.tables import records_frame

    records = list(records)
    first_seed = [r for r in records if tuple(r.get("order", ()))[4:5] == (0,)]
    choices = configured_choices(run_dir) if choices is None else choices
    groups = tradeoff_groups(records_frame(records))
    several = len({(g["dataset"], g["model"]) for g in groups}) > 1
    figures: dict[tuple, Figure2] = {}
    for group in groups:
        same = [r for r in first_seed if (r["dataset"], r["model"], r["attack_label"])
                == (group["dataset"], group["model"], group["attack"])]  # fmt: skip
        curve = [r for r in same if r["defense"] == group["defense"] and r.get("intensity") is not None
                 and other_params(r, group["knob"]) == group["others"]]  # fmt: skip
        if not curve:
            continue
        none = [r for r in same if r["defense"] == "none"]
        # Without a ``none`` cell, the grid's first defense saved the undefended features.
        first = min(same, key=lambda r: tuple(r.get("order", ())))
        reference = Panel("no defense", none[0]["cell_id"], none[0]) if none else Panel("no defense", first["cell_id"], None)
        picked = pick_intensities(curve, choices.get(group["defense"], {}))
        panels = [reference] + [Panel(f"{group['knob']} = {tick_label(r['intensity'])}", r["cell_id"], r) for r in picked]
        key = (group["dataset"], group["model"], group["defense"], group["fixed"])
        if key not in figures:
            parts = [group["defense"], group["fixed"]] + ([group["dataset"], group["model"]] if several else [])
            stem = Path(run_dir) / FIGURE_DIR / (PREFIX + "_".join(slug(p) for p in parts if p))
            fixed = f" ({group['fixed']})" if group["fixed"] else ""
            title = (f"{group['defense']}{fixed} on {group['dataset']} / {group['model']}: "
                     f"BA/ASR against {group['knob']}, t-SNE at no defense, low and high {group['knob']}")  # fmt: skip
            figures[key] = Figure2(stem, title, [])
        figures[key].rows.append(Figure2Row(group, panels, int(curve[0]["seed"])))
    return list(figures.values())


def figure2_figure(rows: list[tuple[Figure2Row, list[PanelResult], Any]], title: str) -> Figure:
    """Per row: the trade-off curve, then the t-SNE panels (``Any``: the features' :class:`CellFeatures`)."""
    ncols = 1 + max(len(results) for _, results, _ in rows)
    fig = Figure(figsize=(4.6 + 3.6 * (ncols - 1) + 1.6, 3.9 * len(rows) + 0.8), layout="constrained")
    grid = fig.add_gridspec(len(rows), ncols, width_ratios=[1.3] + [1.0] * (ncols - 1))
    classes: list[str] = []
    for i, (row, results, saved) in enumerate(rows):
        ax = fig.add_subplot(grid[i, 0])
        draw_tradeoff(ax, row.group)
        ax.set_title(f"{row.group['attack']}", fontsize="medium")
        ax.legend(loc="lower left", frameon=True, fontsize="x-small")
        for j, result in enumerate(results):
            draw_panel(fig.add_subplot(grid[i, j + 1]), result, saved.benign_labels, saved.poisoned_labels,
                       saved.classes, saved.target)  # fmt: skip
        classes = classes or list(saved.classes)
    fig.legend(handles=legend_handles(classes), loc="outside right center", fontsize="small", title="class / sample",
               title_fontsize="small", frameon=False)  # fmt: skip
    fig.suptitle(title, fontsize="medium")
    return fig


def draw(store: RecordStore, figure: Figure2, memo: EmbeddingMemo | None = None,
         sample: tuple[int, int] | None = None) -> Path | None:  # fmt: skip
    """Embed and draw one Figure 2; its PNG, or None when no row has all its t-SNE features."""
    rows = []
    for row in figure.rows:
        loaded = [panel_features(store, panel) for panel in row.panels]
        if any(item is None for item in loaded):
            continue
        usable = [item for item in loaded if item is not None]
        if sample is not None and any((i.saved.per_class, i.saved.poisoned_per_class) != sample for i in usable):
            continue
        if not all(i.saved.same_sample(usable[0].saved) for i in usable):
            continue
        results = embed_panels(usable, row.seed, f"figure 2 [{row.group['defense']}, {row.group['attack']}]", memo)
        rows.append((row, results, usable[0].saved))
    if not rows:
        return None
    with themed():
        return save_figure(figure2_figure(rows, figure.title), figure.stem)[0]


def write_figure2(
    run_dir: Path, only: set[str] | None = None, redraw: bool = True, memo: EmbeddingMemo | None = None
) -> list[Path]:
    """Draw the run's Figure-2 compositions; return the PNGs drawn.

    ``redraw=False`` skips a figure whose files are newer than every record and features file
    it shows (the embedding is the slow part).
    """
    run_dir = Path(run_dir)
    store = RecordStore(run_dir)
    records = [r for r in store.read_all() if only is None or r["cell_id"] in only]
    sample = configured_sample(run_dir)
    memo = {} if memo is None else memo
    pngs, reused = [], False
    for figure in figure_plan(run_dir, records):
        cells = {p.source for row in figure.rows for p in row.panels} | {
            r["cell_id"] for r in records if r["defense"] in {row.group["defense"] for row in figure.rows}}
        sources = [store.features_path(c) for c in cells] + [store.path(c) for c in cells]
        if not redraw and newer_than(figure.files(), sources):
            continue
        if not reused:  # the panels the t-SNE figures show are embedded already
            reuse_saved_embeddings(store, run_dir, records, memo)
            reused = True
        png = draw(store, figure, memo, sample)
        pngs += [png] if png is not None else []
    return pngs
