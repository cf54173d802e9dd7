"""Tables from cell records: the paper layout as CSV, Markdown, LaTeX and HTML, plus a long CSV.

Paper layout: one row per attack, one column group per defense with BA and ASR sub-columns;
with several seeds each entry is ``mean ± std`` (sample standard deviation). One table per
(dataset, model). The long CSV (``cells.csv``, one row per cell) is for pandas users and scripts.

The best defense of a row is printed in bold. "Best" must weigh both numbers -- a transformation
that wipes out benign accuracy also wipes out the ASR -- so when the row has a no-defense
reference it is the defense with the highest defense effectiveness rating,
DER = [max(0, ASR drop) - max(0, BA drop) + 1] / 2 (rates as fractions), ties broken by lower
ASR; without a reference, the lowest ASR, ties broken by higher BA.

:func:`paper_tables` builds each table once as a DataFrame; pandas renders it (``to_markdown``
through tabulate, ``Styler.to_latex``, ``Styler.to_html``, ``to_csv``). The renderers here only
escape labels for their format and mark the best defense.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pandas as pd
from pandas.io.formats.style import Styler

from bench.core.files import atomic_write_text
from bench.core.records import RecordStore

LONG_COLUMNS = [
    "dataset", "model", "attack", "attack_label", "defense", "defense_label", "intensity", "seed",
    "ba", "asr", "ra", "cell_id",
]  # fmt: skip
METRICS = ("ba", "asr")
CSV_DECIMALS = 4  # cells.csv: percentages to 1e-4, not float noise such as 96.89999999999999


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
    """The row's best defense, from :func:`paper_tables`' numeric ranking (``table.attrs["best"]``)."""
    return table.attrs["best"].get(attack)


def best_cells(table: pd.DataFrame) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(attack, [(defense, "BA"), (defense, "ASR")]) for every row that has a best defense."""
    for attack in table.index:
        best = best_defense(table, attack)
        if best is not None:
            yield attack, [(best, "BA"), (best, "ASR")]


def _md(text: object) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(table: pd.DataFrame, title: str = "") -> str:
    """A pipe table: one ``defense BA`` and ``defense ASR`` column per defense, best in bold."""
    shown = table.map(_md)
    for attack, columns in best_cells(table):
        for column in columns:
            shown.loc[attack, column] = f"**{shown.loc[attack, column]}**"
    shown.columns = [f"{_md(d)} {m}" for d, m in shown.columns]
    shown.index = [_md(a) for a in shown.index]
    shown = shown.rename_axis("attack").reset_index()
    body = shown.to_markdown(index=False, tablefmt="pipe", disable_numparse=True,
                             colalign=("left",) + ("right",) * (shown.shape[1] - 1))  # fmt: skip
    return (f"### {title}\n\n" if title else "") + body + "\n"


def _styled(table: pd.DataFrame, text: Callable[[str], str], bold: Callable[[str], str], corner: str) -> Styler:
    """The table for Styler's writers: labels and values through ``text`` (the format's escaping),
    the best defense of each row through ``bold`` too, ``corner`` above the attack names."""
    shown = table.copy()
    shown.index.name = None
    shown.columns.names = [corner, None]
    styler = shown.style.format(text).format_index(text, axis=0).format_index(text, axis=1)
    for attack, columns in best_cells(table):
        styler = styler.format(lambda v: bold(text(v)), subset=pd.IndexSlice[[attack], columns])
    return styler


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#",
    "{": r"\{", "}": r"\}", "$": r"\$", "±": r"$\pm$",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}  # fmt: skip


def _tex(text: object) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, caption: str = "") -> str:
    """A booktabs table with one multicolumn group per defense; best defense per row in bold."""
    n = len(dict.fromkeys(table.columns.get_level_values(0)))
    styler = _styled(table, _tex, lambda v: rf"\textbf{{{v}}}", "Attack")
    tex = styler.to_latex(column_format="l" + "cc" * n, position="t", position_float="centering", hrules=True,
                          multicol_align="c", caption=_tex(caption) if caption else None, environment="table")  # fmt: skip
    # Styler has no rules under column groups: booktabs' cmidrules go below the defense names.
    lines = tex.splitlines()
    groups = lines.index(r"\toprule") + 1
    lines.insert(groups + 1, "".join(rf"\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}" for i in range(n)))
    return "\n".join(lines) + "\n"


def to_html(table: pd.DataFrame, title: str = "") -> str:
    """The paper layout as an HTML table (defense column groups, best defense per row in bold)."""
    styler = _styled(table, html.escape, lambda v: f"<b>{v}</b>", "attack")
    if title:
        styler = styler.set_caption(html.escape(title))
    return styler.to_html(exclude_styles=True)


def write_tables(run_dir: Path, only: set[str] | None = None) -> str:
    """Write cells.csv and table.{csv,md,tex} for a run directory; return the Markdown.

    ``only`` restricts the tables to these cell ids (the current grid, when an earlier run with
    another config left records in the same directory).
    """
    run_dir = Path(run_dir)
    records = RecordStore(run_dir).read_all()
    df = records_frame(r for r in records if only is None or r["cell_id"] in only)
    present = [c for c in LONG_COLUMNS if c in df.columns]
    atomic_write_text(df[present].round(CSV_DECIMALS).to_csv(index=False), run_dir / "cells.csv")
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
