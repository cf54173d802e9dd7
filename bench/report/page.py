"""The report page of a run: ``report.html`` with its tables, every figure and its configuration.

:func:`make_figures` draws the figures a run's records allow, then :func:`write_report` fills the
jinja2 template ``templates/report.html.j2`` (autoescaped; the tables come from
:func:`bench.report.tables.to_html`). Everything is rebuilt from the run directory, so the page
can be regenerated at any time.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup

from bench.core.files import atomic_write_text
from bench.core.records import RecordStore
from bench.core.safe_yaml import run_config_snapshot
from bench.report.tables import paper_tables, records_frame, to_html

FIGURE_SECTIONS = (
    ("figure2_", "Figure 2: trade-off and feature space of each swept defense",
     "Per attack: BA and ASR (%) against the defense's intensity (dashed: no defense) beside t-SNE panels at no "
     "defense, a low and a high intensity (colour = true class, circle = benign, X = poisoned)."),
    ("figure3_", "Figure 3: inverted backdoor and purified inputs",
     "Columns: poisoned test images (title: true class). Rows: the clean original, the poisoned image, the real "
     "trigger (difference, amplified), BTI-DBF's inversion G(clean) and its difference from the clean image, "
     "and for BTI-DBF (P) the purified image the model classifies."),
    ("tradeoff-", "Trade-off curves",
     "BA and ASR (%) as the defense's intensity grows; dashed lines are the undefended model."),
    ("tsne-", "t-SNE of penultimate features",
     "Colour = true class, circle = benign, X = poisoned; large circles are class centroids, the star the "
     "poisoned centroid. Titles give the share of poisoned samples nearest the target class centroid."),
    ("", "Other figures", ""),
)  # fmt: skip


def _figure_sections(run_dir: Path) -> list[dict[str, Any]]:
    """The figures under ``figures/``, grouped into the page's sections by file-name prefix."""
    from bench.report.plots import FIGURE_DIR

    pngs = sorted((run_dir / FIGURE_DIR).glob("*.png"))
    sections, shown = [], set()
    for prefix, heading, note in FIGURE_SECTIONS:
        chosen = [p for p in pngs if p.name.startswith(prefix) and p not in shown]
        if not chosen:
            continue
        shown.update(chosen)
        figures = [{"png": png.relative_to(run_dir).as_posix(), "name": png.stem,
                    "pdf": png.with_suffix(".pdf").relative_to(run_dir).as_posix() if png.with_suffix(".pdf").exists()
                    else None} for png in chosen]  # fmt: skip
        sections.append({"heading": heading, "note": note, "figures": figures})
    return sections


def _run_summary(df: pd.DataFrame) -> str:
    if df.empty:
        return "no finished cells"
    seconds = sum(s.get("total", 0.0) for s in df["seconds"] if isinstance(s, dict)) if "seconds" in df else math.nan
    devices = ", ".join(sorted({str(d) for d in df.get("device", pd.Series(dtype=str)).dropna()})) or "?"
    versions = df["versions"].iloc[0] if "versions" in df and isinstance(df["versions"].iloc[0], dict) else {}
    parts = [f"{len(df)} cells", f"{seconds:.1f} s of compute" if seconds == seconds else "", f"device: {devices}",
             ", ".join(f"{k} {v}" for k, v in versions.items())]  # fmt: skip
    return " · ".join(p for p in parts if p)


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.PackageLoader("bench.report", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)  # fmt: skip
    return env.get_template("report.html.j2")


def write_report(run_dir: Path, only: set[str] | None = None) -> Path:
    """``run_dir/report.html``: tables, every figure in ``figures/`` and the run configuration."""
    run_dir = Path(run_dir)
    df = records_frame(r for r in RecordStore(run_dir).read_all() if only is None or r["cell_id"] in only)
    config = run_dir / "config.yaml"
    config_text = config.read_text() if config.is_file() else "(no config.yaml in the run directory)"
    page = _template().render(
        name=str(run_config_snapshot(run_dir).get("name") or run_dir.name),
        summary=_run_summary(df),
        written=time.strftime("%Y-%m-%d %H:%M:%S"),
        tables=[Markup(to_html(t, f"BA and ASR (%) on {d} / {m}; best defense per row in bold"))
                for (d, m), t in paper_tables(df).items()],  # fmt: skip
        downloads=[f for f in ("table.md", "table.csv", "table.tex", "cells.csv") if (run_dir / f).exists()],
        sections=_figure_sections(run_dir),
        config=config_text,
    )
    path = run_dir / "report.html"
    atomic_write_text(page, path)
    return path


def make_figures(
    run_dir: Path,
    only: set[str] | None = None,
    tsne: bool = False,
    strict: bool = True,
    redraw: bool = True,
) -> list[Path]:
    """Draw every figure the run's records allow, then write the report page; return the PNGs drawn.

    Trade-off curves need only the records, the inversion figures (Figure 3) the illustration
    images saved with them; the t-SNE figures and the Figure-2 compositions (``tsne=True``) the
    records and the features saved with them, each panel embedded once. ``redraw=False`` draws only the t-SNE figures that are
    missing, incomplete or older than what they show (embedding is the slow part). With
    ``strict=False`` a figure that fails is reported on stderr instead of raised: the records and
    tables are already safe when a run calls this at its end.
    """
    from bench.report.inversion import write_inversion_figures
    from bench.report.plots import write_tradeoff_figures

    run_dir = Path(run_dir)
    records = [r for r in RecordStore(run_dir).read_all() if only is None or r["cell_id"] in only]
    steps = [("trade-off curves", lambda: write_tradeoff_figures(run_dir, records)),
             ("inversion figures", lambda: write_inversion_figures(run_dir, only=only))]  # fmt: skip
    if tsne and records:
        from bench.report.figure2 import write_figure2
        from bench.report.tsne import write_tsne_figures

        memo: dict = {}
        steps.append(("t-SNE", lambda: write_tsne_figures(run_dir, only=only, redraw=redraw, memo=memo)))
        steps.append(("Figure 2", lambda: write_figure2(run_dir, only=only, redraw=redraw, memo=memo)))
    pngs: list[Path] = []
    for what, step in steps:
        try:
            pngs += step()
        except Exception as err:
            if strict:
                raise
            print(f"warning: could not draw the {what}: {err}", file=sys.stderr)
    write_report(run_dir, only)
    return pngs
