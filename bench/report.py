"""Tables from cell records: the paper layout as CSV, Markdown and LaTeX, plus a long CSV.

Paper layout: one row per attack, one column group per defense with BA and ASR sub-columns;
with several seeds each entry is ``mean ± std`` (sample standard deviation). One table per
(dataset, model). The long CSV (``cells.csv``, one row per cell) is for pandas users and scripts.

The best defense of a row is printed in bold. "Best" must weigh both numbers -- a transformation
that wipes out benign accuracy also wipes out the ASR -- so when the row has a no-defense
reference it is the defense with the highest defense effectiveness rating,
DER = [max(0, ASR drop) - max(0, BA drop) + 1] / 2 (rates as fractions), ties broken by lower
ASR; without a reference, the lowest ASR, ties broken by higher BA.

:func:`write_report` adds ``report.html``: the tables, every figure under ``figures/`` and the
run's configuration on one page; :func:`make_figures` draws the figures a run allows first.
"""

from __future__ import annotations

import html
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from bench.store import RecordStore, atomic_write_text

LONG_COLUMNS = [
    "dataset", "model", "attack", "attack_label", "defense", "defense_label", "intensity", "seed",
    "ba", "asr", "ra", "cell_id",
]  # fmt: skip
METRICS = ("ba", "asr")


def records_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Long format, one row per cell, in grid order."""
    rows = list(records)
    if not rows:
        return pd.DataFrame(columns=LONG_COLUMNS)
    rows.sort(key=lambda r: tuple(r.get("order", ())))
    df = pd.DataFrame(rows)
    df["_order"] = [tuple(r.get("order", ())) for r in rows]
    return df


def _fmt(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def der(ba: float, asr: float, ref_ba: float, ref_asr: float) -> float:
    """Defense effectiveness rating in [0, 1] from percentages: (ASR drop - BA drop + 1) / 2."""
    return (max(0.0, ref_asr - asr) - max(0.0, ref_ba - ba) + 100.0) / 200.0


def best_defenses(group: pd.DataFrame) -> dict[str, str | None]:
    """attack label -> label of the row's best defense (see the module docstring), from numeric means."""
    means = group.groupby(["attack_label", "defense_label"], sort=False).agg(
        defense=("defense", "first"), ba=("ba", "mean"), asr=("asr", "mean"))
    best: dict[str, str | None] = {}
    for attack, row in means.groupby(level=0, sort=False):
        row = row.droplevel(0)
        reference = row[row["defense"] == "none"]
        candidates = row[(row["defense"] != "none") & row["ba"].notna() & row["asr"].notna()]
        if candidates.empty:
            best[attack] = None
            continue
        if len(reference) == 1 and not reference[["ba", "asr"]].isna().any(axis=None):
            ref_ba, ref_asr = float(reference["ba"].iloc[0]), float(reference["asr"].iloc[0])
            keys = {label: (-der(r.ba, r.asr, ref_ba, ref_asr), r.asr, -r.ba) for label, r in candidates.iterrows()}
        else:
            keys = {label: (r.asr, -r.ba) for label, r in candidates.iterrows()}
        best[attack] = min(keys, key=keys.__getitem__)
    return best


def paper_tables(df: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """(dataset, model) -> wide table: index = attack, columns = (defense, BA|ASR), str cells.

    ``table.attrs["best"]`` maps each attack to the label of its best defense (or None).
    """
    tables: dict[tuple[str, str], pd.DataFrame] = {}
    if df.empty:
        return tables
    for (dataset, model), group in df.groupby(["dataset", "model"], sort=False):
        attacks = list(dict.fromkeys(group.sort_values("_order")["attack_label"]))
        ordered = group.assign(_def_order=[o[3] for o in group["_order"]]).sort_values("_def_order")
        defenses = list(dict.fromkeys(ordered["defense_label"]))
        columns = pd.MultiIndex.from_product([defenses, [m.upper() for m in METRICS]])
        table = pd.DataFrame(index=pd.Index(attacks, name="attack"), columns=columns, dtype=object)
        for (attack, defense), cell in group.groupby(["attack_label", "defense_label"]):
            for metric in METRICS:
                table.loc[attack, (defense, metric.upper())] = _fmt(cell[metric])
        table = table.fillna("-")
        table.attrs["best"] = best_defenses(group)
        tables[(dataset, model)] = table
    return tables


def best_defense(table: pd.DataFrame, attack: str) -> str | None:
    """The row's best defense: from :func:`paper_tables`' numeric ranking when the table has it,
    else (a table built by hand) the lowest printed mean ASR, ties broken by higher BA ("none" excluded)."""
    if "best" in table.attrs:
        return table.attrs["best"].get(attack)
    best, best_key = None, None
    for defense in dict.fromkeys(table.columns.get_level_values(0)):
        if defense == "none":
            continue
        try:
            asr = float(str(table.loc[attack, (defense, "ASR")]).split(" ")[0])
            ba = float(str(table.loc[attack, (defense, "BA")]).split(" ")[0])
        except ValueError:
            continue
        key = (asr, -ba)
        if best_key is None or key < best_key:
            best, best_key = defense, key
    return best


def _md(text: object) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(table: pd.DataFrame, title: str = "") -> str:
    defenses = list(dict.fromkeys(table.columns.get_level_values(0)))
    head = "| attack | " + " | ".join(f"{_md(d)} BA | {_md(d)} ASR" for d in defenses) + " |"
    rule = "|---|" + "---:|" * (2 * len(defenses))
    lines = [f"### {title}", ""] if title else []
    lines += [head, rule]
    for attack in table.index:
        best = best_defense(table, attack)
        cells = []
        for d in defenses:
            for m in ("BA", "ASR"):
                v = _md(table.loc[attack, (d, m)])
                cells.append(f"**{v}**" if d == best else v)
        lines.append(f"| {_md(attack)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#",
    "{": r"\{", "}": r"\}", "$": r"\$", "±": r"$\pm$",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}  # fmt: skip


def _tex(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(table: pd.DataFrame, caption: str = "") -> str:
    """A booktabs table with one multicolumn group per defense; best defense per row in bold."""
    defenses = list(dict.fromkeys(table.columns.get_level_values(0)))
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{_tex(caption)}}}")
    lines.append(r"\begin{tabular}{l" + "cc" * len(defenses) + "}")
    lines.append(r"\toprule")
    lines.append("Attack & " + " & ".join(rf"\multicolumn{{2}}{{c}}{{{_tex(d)}}}" for d in defenses) + r" \\")
    lines.append("".join(rf"\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}" for i in range(len(defenses))))
    lines.append(" & " + " & ".join("BA & ASR" for _ in defenses) + r" \\")
    lines.append(r"\midrule")
    for attack in table.index:
        best = best_defense(table, attack)
        cells = []
        for d in defenses:
            for m in ("BA", "ASR"):
                v = _tex(str(table.loc[attack, (d, m)]))
                cells.append(rf"\textbf{{{v}}}" if d == best else v)
        lines.append(f"{_tex(str(attack))} & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_tables(run_dir: Path, only: set[str] | None = None) -> str:
    """Write cells.csv and table.{csv,md,tex} for a run directory; return the Markdown.

    ``only`` restricts the tables to these cell ids (the current grid, when an earlier run with
    another config left records in the same directory).
    """
    run_dir = Path(run_dir)
    records = RecordStore(run_dir).read_all()
    df = records_frame(r for r in records if only is None or r["cell_id"] in only)
    present = [c for c in LONG_COLUMNS if c in df.columns]
    atomic_write_text(df[present].to_csv(index=False), run_dir / "cells.csv")
    markdown, latex, csv_parts = [], [], []
    for (dataset, model), table in paper_tables(df).items():
        title = f"{dataset} / {model}"
        markdown.append(to_markdown(table, title))
        latex.append(to_latex(table, f"BA and ASR (%) on {title}"))
        flat = table.copy()
        flat.columns = [f"{d} {m}" for d, m in flat.columns]
        csv_parts.append(flat.reset_index().assign(dataset=dataset, model=model))
    md = "\n".join(markdown) if markdown else "(no finished cells)\n"
    atomic_write_text(md, run_dir / "table.md")
    atomic_write_text("\n".join(latex), run_dir / "table.tex")
    wide = pd.concat(csv_parts) if csv_parts else pd.DataFrame()
    atomic_write_text(wide.to_csv(index=False), run_dir / "table.csv")
    return md


# ----------------------------------------------------------------------------- report page


def to_html(table: pd.DataFrame, title: str = "") -> str:
    """The paper layout as an HTML table (defense column groups, best defense per row in bold)."""
    defenses = list(dict.fromkeys(table.columns.get_level_values(0)))
    esc = html.escape
    rows = [f"<caption>{esc(title)}</caption>" if title else "", "<thead><tr><th rowspan=2>attack</th>"
            + "".join(f"<th colspan=2>{esc(str(d))}</th>" for d in defenses) + "</tr>",
            "<tr>" + "<th>BA</th><th>ASR</th>" * len(defenses) + "</tr></thead><tbody>"]  # fmt: skip
    for attack in table.index:
        best = best_defense(table, attack)
        cells = "".join(
            f"<td>{'<b>' if d == best else ''}{esc(str(table.loc[attack, (d, m)]))}{'</b>' if d == best else ''}</td>"
            for d in defenses
            for m in ("BA", "ASR")
        )
        rows.append(f"<tr><th>{esc(str(attack))}</th>{cells}</tr>")
    return "<table>" + "\n".join(rows) + "</tbody></table>"


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
    from bench.plots import FIGURE_DIR

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
    paths: Any = None,
    device: str | Any = None,
    only: set[str] | None = None,
    tsne: bool = False,
    strict: bool = True,
) -> list[Path]:
    """Draw every figure the run's records allow, then write the report page; return the PNGs.

    Trade-off curves need only the records. The t-SNE figure (``tsne=True``) re-embeds test images
    through the cached models, so it needs the run's data and artifact cache (``paths``). With
    ``strict=False`` a figure that fails is reported on stderr instead of raised: the records and
    tables are already safe when a run calls this at its end.
    """
    from bench.plots import write_tradeoff_figures

    run_dir = Path(run_dir)
    records = [r for r in RecordStore(run_dir).read_all() if only is None or r["cell_id"] in only]
    steps = [("trade-off curves", lambda: write_tradeoff_figures(run_dir, records))]
    if tsne and paths is not None and records:
        from bench.tsne import write_tsne_figures

        steps.append(("t-SNE", lambda: write_tsne_figures(run_dir, paths, None if device is None else str(device))))
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
