"""The REFINE paper's Figure 3 from a run directory: what trigger inversion recovers.

BTI-DBF inverts the backdoor into a generator G: G(x) is what it believes the backdoored version
of a clean image x looks like. Set beside the real poisoned image, it shows how close the
inversion came to the real trigger; for BTI-DBF (P), the purified image is what the purifier
feeds the model instead of the poisoned one. The cells saved these images at evaluation time
(:mod:`bench.core.illustrations`); this module draws them: one figure per (dataset, model,
attack), ``figures/figure3_<attack>.png``, one column per image and the rows clean, poisoned,
then for every defense that saved illustrations its rows (inverted, the inverted image's
difference from the clean one, amplified, purified). No model, data or cache is touched.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from bench.core.errors import BenchError
from bench.core.illustrations import CellIllustrations
from bench.core.records import RecordStore
from bench.report.plots import FIGURE_DIR, save_figure, slug, themed

PREFIX = "figure3_"
DIFFERENCE_GAIN = 3.0  # the difference rows show 0.5 + gain * (a - b): a faint trigger becomes visible


@dataclass
class InversionFigure:
    """The illustrated cells of one (dataset, model, attack), in grid order."""

    stem: Path
    title: str
    cells: list[tuple[dict[str, Any], CellIllustrations]]  # (record, its illustrations)


def _order(record: dict[str, Any]) -> tuple:
    return tuple(record.get("order", ()))


def figure_plan(run_dir: Path, records: Iterable[dict[str, Any]], store: RecordStore | None = None) -> list[InversionFigure]:
    """One figure per (dataset, model, attack) of the first seed whose cells saved illustrations."""
    store = store or RecordStore(run_dir)
    groups: dict[tuple, list[tuple[dict[str, Any], CellIllustrations]]] = {}
    for record in sorted(records, key=_order):
        if _order(record)[4:5] != (0,):
            continue
        item = store.read_illustrations(record["cell_id"])
        if item is not None and item.rows:
            groups.setdefault(_order(record)[:3], []).append((record, item))
    several = len({key[:2] for key in groups}) > 1
    figures = []
    for key in sorted(groups):
        first = groups[key][0][0]
        dataset, model = first.get("dataset_label", first["dataset"]), first.get("model_label", first["model"])
        parts = [first["attack_label"]] + ([dataset, model] if several else [])
        stem = Path(run_dir) / FIGURE_DIR / (PREFIX + "_".join(slug(p) for p in parts))
        title = (f"{first['attack_label']} on {dataset} / {model}: poisoned test images, the inverted backdoor "
                 f"G(clean) and the purified input (seed {first['seed']})")  # fmt: skip
        figures.append(InversionFigure(stem, title, groups[key]))
    return figures


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = 0.5 + DIFFERENCE_GAIN * (a.astype(np.float32) - b.astype(np.float32)) / 255
    return (diff.clip(0, 1) * 255).round().astype(np.uint8)


def figure_rows(cells: list[tuple[dict[str, Any], CellIllustrations]]) -> list[tuple[str, np.ndarray]]:
    """(row label, N x C x H x W uint8 images): clean, poisoned, then each defense's rows."""
    first = cells[0][1]
    rows = [("clean", first.clean), ("poisoned", first.poisoned),
            (f"poisoned − clean (×{DIFFERENCE_GAIN:g})", _difference(first.poisoned, first.clean))]  # fmt: skip
    names = [record["defense"] for record, _ in cells]
    for record, item in cells:
        if not np.array_equal(item.index, first.index):  # another choice of images: not comparable by column
            continue
        # The defense's name; its label (wrapped: labels list every parameter) only where names repeat.
        who = record["defense"] if names.count(record["defense"]) == 1 else textwrap.fill(record["defense_label"], 32)
        # The class the inversion named as the target: a wrong one explains a surviving backdoor.
        target = record.get("defense_findings", {}).get("detected_target")
        known = isinstance(target, int) and 0 <= target < len(first.classes)
        named = f"\ntarget found: {first.classes[target]}" if known else ""
        for name, images in item.rows.items():
            rows.append((f"{name}\n{who}" + (named if name == "inverted" else ""), images))
            if name == "inverted":
                rows.append((f"inverted − clean (×{DIFFERENCE_GAIN:g})\n{who}", _difference(images, item.clean)))
    return rows


def inversion_figure(figure: InversionFigure) -> Figure:
    """One column per image, one row per kind of image; columns titled with the true class."""
    rows = figure_rows(figure.cells)
    first = figure.cells[0][1]
    n = first.poisoned.shape[0]
    fig = Figure(figsize=(1.25 * n + 2.2, 1.3 * len(rows) + 0.8), layout="constrained")
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            image = images[c].transpose(1, 2, 0)
            if image.shape[2] == 1:
                ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(first.classes[int(first.labels[c])], fontsize="small")
            if c == 0:
                ax.set_ylabel(label, fontsize="x-small", rotation=0, ha="right", va="center")
    fig.suptitle(figure.title, fontsize="medium")
    return fig


def write_inversion_figures(run_dir: Path, only: set[str] | None = None, out: Path | None = None) -> list[Path]:
    """Draw the run's Figure-3 figures; return their PNGs (PDFs beside them).

    ``out`` names the PNG to write instead of ``figures/figure3_<attack>.png``; with several
    figures, ``_<attack>`` is added to its stem.
    """
    run_dir = Path(run_dir)
    store = RecordStore(run_dir)
    records = [r for r in store.read_all() if only is None or r["cell_id"] in only]
    figures = figure_plan(run_dir, records, store)
    pngs = []
    for figure in figures:
        stem = figure.stem
        if out is not None:
            stem = out.with_suffix("") if len(figures) == 1 else out.with_name(f"{out.stem}_{figure.stem.name[len(PREFIX):]}")
        with themed():
            pngs.append(save_figure(inversion_figure(figure), stem)[0])
    return pngs


def show_inversion(run_dir: Path, out: Path | None = None) -> list[Path]:
    """``run_bench.py show-inversion``: the figures, or one error line when no cell saved illustrations."""
    pngs = write_inversion_figures(run_dir, out=out)
    if not pngs:
        raise BenchError(f"{run_dir}: no cell of the first seed saved illustration images; only defenses with an "
                         "illustration hook (btidbf, btidbf_u, btidbf_p) save them, with illustrations.count > 0")  # fmt: skip
    return pngs
