"""The report page of a run: ``report.html`` with its tables, every figure and its configuration.

:func:`make_figures` draws the figures a run's records allow, then :func:`write_report` writes the
page. Everything is rebuilt from the run directory, so the page can be regenerated at any time.
"""

from __future__ import annotations

import html
import math
import sys
import time
from pathlib import Path

import pandas as pd

from bench.core.files import atomic_write_text
from bench.core.records import RecordStore
from bench.report.tables import paper_tables, records_frame, to_html

_PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
caption { font-weight: bold; text-align: left; padding-bottom: 0.4em; }
th, td { border-top: 1px solid #bbb; border-bottom: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
tbody th { text-align: left; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.meta { color: #555; font-size: 0.9em; }
"""

FIGURE_SECTIONS = (
    ("tradeoff-", "Trade-off curves",
     "BA and ASR (%) as the defense's intensity grows; dashed lines are the undefended model."),
    ("tsne-", "t-SNE of penultimate features",
     "Colour = true class, circle = benign, X = poisoned; large circles are class centroids, the star the "
     "poisoned centroid. Titles give the share of poisoned samples nearest the target class centroid."),
    ("", "Other figures", ""),
)  # fmt: skip


def _figure_html(run_dir: Path) -> list[str]:
    from bench.report.plots import FIGURE_DIR

    pngs = sorted((run_dir / FIGURE_DIR).glob("*.png"))
    parts, shown = [], set()
    for prefix, heading, note in FIGURE_SECTIONS:
        chosen = [p for p in pngs if p.name.startswith(prefix) and p not in shown]
        if not chosen:
            continue
        shown.update(chosen)
        parts.append(f"<h2>{html.escape(heading)}</h2>" + (f"<p class=meta>{html.escape(note)}</p>" if note else ""))
        for png in chosen:
            rel = png.relative_to(run_dir).as_posix()
            pdf = png.with_suffix(".pdf")
            link = f' · <a href="{html.escape(pdf.relative_to(run_dir).as_posix())}">PDF</a>' if pdf.exists() else ""
            parts.append(f'<figure><img src="{html.escape(rel)}" alt="{html.escape(png.stem)}">'
                         f"<figcaption>{html.escape(png.stem)}{link}</figcaption></figure>")  # fmt: skip
    return parts


def _run_summary(df: pd.DataFrame) -> str:
    if df.empty:
        return "no finished cells"
    seconds = sum(s.get("total", 0.0) for s in df["seconds"] if isinstance(s, dict)) if "seconds" in df else math.nan
    devices = ", ".join(sorted({str(d) for d in df.get("device", pd.Series(dtype=str)).dropna()})) or "?"
    versions = df["versions"].iloc[0] if "versions" in df and isinstance(df["versions"].iloc[0], dict) else {}
    parts = [f"{len(df)} cells", f"{seconds:.1f} s of compute" if seconds == seconds else "", f"device: {devices}",
             ", ".join(f"{k} {v}" for k, v in versions.items())]  # fmt: skip
    return " · ".join(p for p in parts if p)


def _config_name(config_text: str) -> str | None:
    import yaml

    try:
        raw = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return None
    return str(raw["name"]) if isinstance(raw, dict) and raw.get("name") else None


def write_report(run_dir: Path, only: set[str] | None = None) -> Path:
    """``run_dir/report.html``: tables, every figure in ``figures/`` and the run configuration."""
    run_dir = Path(run_dir)
    df = records_frame(r for r in RecordStore(run_dir).read_all() if only is None or r["cell_id"] in only)
    config = run_dir / "config.yaml"
    config_text = config.read_text() if config.is_file() else "(no config.yaml in the run directory)"
    name = _config_name(config_text) or run_dir.name
    tables = [to_html(t, f"BA and ASR (%) on {d} / {m}; best defense per row in bold")
              for (d, m), t in paper_tables(df).items()]  # fmt: skip
    downloads = " · ".join(f'<a href="{f}">{f}</a>' for f in ("table.md", "table.csv", "table.tex", "cells.csv")
                           if (run_dir / f).exists())  # fmt: skip
    body = [
        f"<h1>Run {html.escape(name)}</h1>",
        f"<p class=meta>{html.escape(_run_summary(df))} · written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        "<h2>Tables</h2>",
        *(tables or ["<p>(no finished cells)</p>"]),
        f"<p class=meta>Downloads: {downloads}</p>" if downloads else "",
        *_figure_html(run_dir),
        "<h2>Configuration</h2>",
        f"<pre>{html.escape(config_text)}</pre>",
    ]
    page = ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(name)}: backdoor benchmark report</title><style>{_PAGE_STYLE}</style></head>"
            "<body>\n" + "\n".join(p for p in body if p) + "\n</body></html>\n")  # fmt: skip
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

    Trade-off curves need only the records; the t-SNE figures (``tsne=True``) only the records
    and the features saved with them. ``redraw=False`` draws only the t-SNE figures that are
    missing, incomplete or older than what they show (embedding is the slow part). With
    ``strict=False`` a figure that fails is reported on stderr instead of raised: the records and
    tables are already safe when a run calls this at its end.
    """
    from bench.report.plots import write_tradeoff_figures

    run_dir = Path(run_dir)
    records = [r for r in RecordStore(run_dir).read_all() if only is None or r["cell_id"] in only]
    steps = [("trade-off curves", lambda: write_tradeoff_figures(run_dir, records))]
    if tsne and records:
        from bench.report.tsne import write_tsne_figures

        steps.append(("t-SNE", lambda: write_tsne_figures(run_dir, only=only, redraw=redraw)))
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
