"""Tables and the report page from hand-made records: layout, numbers, bold best, LaTeX shape."""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main
from bench.core.records import RecordStore
from bench.report.page import write_report
from bench.report.tables import (
    LONG_COLUMNS,
    best_defense,
    der,
    paper_tables,
    records_frame,
    to_latex,
    to_markdown,
    write_tables,
)

ATTACKS = ["badnets", "blended(alpha=0.1)"]
DEFENSES = [("none", "none", None), ("shrinkpad", "shrinkpad(pad=4)", 4), ("refine", "refine", None)]
# (attack, defense label) -> per-seed (BA, ASR); refine is best on badnets, shrinkpad on blended.
VALUES = {
    ("badnets", "none"): [(98.0, 100.0), (97.0, 99.0)],
    ("badnets", "shrinkpad(pad=4)"): [(95.0, 40.0), (93.0, 30.0)],
    ("badnets", "refine"): [(94.0, 2.0), (96.0, 1.0)],
    ("blended(alpha=0.1)", "none"): [(98.5, 99.5), (97.5, 98.5)],
    ("blended(alpha=0.1)", "shrinkpad(pad=4)"): [(90.0, 10.0), (91.0, 12.0)],
    ("blended(alpha=0.1)", "refine"): [(60.0, 5.0), (62.0, 3.0)],  # lower ASR, but BA collapses
}


def record(attack: str, defense: tuple, seed: int, ba: float, asr: float, ai: int, fi: int, **extra) -> dict:
    name, label, intensity = defense
    return {
        "cell_id": f"{ai}-{fi}-{seed}-{extra.get('dataset', 'mnist5k')}", "dataset": "mnist5k", "model": "small_cnn",
        "attack": attack.split("(")[0], "attack_label": attack, "defense": name, "defense_label": label,
        "defense_params": {} if intensity is None else {"pad": intensity}, "intensity": intensity, "seed": seed,
        "ba": ba, "asr": asr, "ra": 100 - asr, "order": [0, 0, ai, fi, seed], **extra,
    }  # fmt: skip


def hand_made_records() -> list[dict]:
    rows = []
    for ai, attack in enumerate(ATTACKS):
        for fi, defense in enumerate(DEFENSES):
            for seed, (ba, asr) in enumerate(VALUES[(attack, defense[1])]):
                rows.append(record(attack, defense, seed, ba, asr, ai, fi))
    return rows[::-1]  # the report must not depend on the order records are read in


def expected(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def test_paper_table_rows_columns_and_mean_std() -> None:
    (key, table), = paper_tables(records_frame(hand_made_records())).items()  # fmt: skip
    assert key == ("mnist5k", "small_cnn")
    assert list(table.index) == ATTACKS
    assert list(table.columns) == [(label, m) for _, label, _ in DEFENSES for m in ("BA", "ASR")]
    for (attack, label), seeds in VALUES.items():
        assert table.loc[attack, (label, "BA")] == expected([ba for ba, _ in seeds])
        assert table.loc[attack, (label, "ASR")] == expected([asr for _, asr in seeds])


def test_single_seed_is_a_plain_number_and_missing_cells_a_dash() -> None:
    rows = [r for r in hand_made_records() if r["seed"] == 0 and not (r["attack_label"] == "badnets" and r["defense"] == "refine")]
    (_, table), = paper_tables(records_frame(rows)).items()  # fmt: skip
    assert table.loc["blended(alpha=0.1)", ("refine", "BA")] == f"{VALUES[('blended(alpha=0.1)', 'refine')][0][0]:.2f}"
    assert table.loc["badnets", ("refine", "ASR")] == "-"


def test_best_defense_weighs_ba_against_asr() -> None:
    (_, table), = paper_tables(records_frame(hand_made_records())).items()  # fmt: skip
    assert best_defense(table, "badnets") == "refine"
    # REFINE has the lower ASR on blended, but gives up ~37 BA points: ShrinkPad has the higher DER.
    assert best_defense(table, "blended(alpha=0.1)") == "shrinkpad(pad=4)"
    assert der(91.0, 11.0, 98.0, 99.0) > der(61.0, 4.0, 98.0, 99.0)
    # Without a no-defense reference the lowest ASR wins.
    rows = [r for r in hand_made_records() if r["defense"] != "none"]
    (_, table), = paper_tables(records_frame(rows)).items()  # fmt: skip
    assert best_defense(table, "blended(alpha=0.1)") == "refine"


def test_markdown_bolds_exactly_the_best_defense() -> None:
    (_, table), = paper_tables(records_frame(hand_made_records())).items()  # fmt: skip
    lines = to_markdown(table, "t").splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[0] == "attack" and len(header) == 1 + 2 * len(DEFENSES)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]] for line in lines[4:]}
    assert set(rows) == set(ATTACKS)
    for attack, best in (("badnets", "refine"), ("blended(alpha=0.1)", "shrinkpad(pad=4)")):
        bold = [header[i + 1] for i, c in enumerate(rows[attack]) if c.startswith("**") and c.endswith("**")]
        assert bold == [f"{best} BA", f"{best} ASR"]


def test_markdown_escapes_pipes_in_labels() -> None:
    rows = [r | {"defense_label": "a|b"} if r["defense"] == "refine" else r for r in hand_made_records()]
    (_, table), = paper_tables(records_frame(rows)).items()  # fmt: skip
    md = to_markdown(table)
    widths = {len(re.split(r"(?<!\\)\|", line)) for line in md.splitlines()}
    assert widths == {2 + 1 + 2 * len(DEFENSES)}


def _strip_escapes(tex: str) -> str:
    return tex.replace(r"\{", "").replace(r"\}", "").replace(r"\&", "").replace(r"\%", "")


def test_latex_is_compile_shaped() -> None:
    rows = [r | {"attack_label": "bad_nets 10% & #1"} if r["attack_label"] == "badnets" else r for r in hand_made_records()]
    (_, table), = paper_tables(records_frame(rows)).items()  # fmt: skip
    tex = to_latex(table, "BA and ASR (%) on mnist5k / small_cnn")
    bare = _strip_escapes(tex)
    depth = 0
    for ch in bare:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0, "a closing brace without its opening brace"
    assert depth == 0
    assert re.findall(r"\\(begin|end)\{(\w+)\}", tex) == [
        ("begin", "table"), ("begin", "tabular"), ("end", "tabular"), ("end", "table")]  # fmt: skip
    lines = tex.splitlines()
    rules = [i for i, line in enumerate(lines) for r in ("toprule", "midrule", "bottomrule") if f"\\{r}" in line]
    assert len(rules) == 3 and rules == sorted(rules)
    assert re.search(r"\\begin\{tabular\}\{l(cc){3}\}", tex)
    assert tex.count(r"\cmidrule(lr)") == len(DEFENSES)
    body = lines[rules[1] + 1 : rules[2]]
    assert len(body) == len(ATTACKS)
    for line in body:
        assert line.endswith(r"\\")
        assert len(re.split(r"(?<!\\)&", line)) == 1 + 2 * len(DEFENSES)
    assert r"bad\_nets 10\% \& \#1" in tex
    assert tex.count(r"\textbf{") == 2 * len(ATTACKS)
    assert r"$\pm$" in tex and "±" not in tex


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_compiles(tmp_path: Path) -> None:
    (_, table), = paper_tables(records_frame(hand_made_records())).items()  # fmt: skip
    doc = "\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n" + to_latex(table) + "\\end{document}\n"
    (tmp_path / "t.tex").write_text(doc)
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "t.tex"], cwd=tmp_path, capture_output=True)
    assert result.returncode == 0, result.stdout[-2000:]


def write_records(run_dir: Path, rows: list[dict]) -> None:
    store = RecordStore(run_dir)
    for row in rows:
        store.write(row)


def test_write_tables_long_csv_and_filter(tmp_path: Path) -> None:
    rows = hand_made_records()
    stale = record("wanet", ("none", "none", None), 0, 10.0, 10.0, 5, 0) | {"cell_id": "stale"}
    write_records(tmp_path, rows + [stale])
    md = write_tables(tmp_path, {r["cell_id"] for r in rows})
    assert "wanet" not in md and (tmp_path / "table.md").read_text() == md
    long = pd.read_csv(tmp_path / "cells.csv")
    assert list(long.columns) == LONG_COLUMNS
    assert len(long) == len(rows) and "stale" not in set(long["cell_id"])
    # Grid order: attack, then defense, then seed.
    order = sorted(rows, key=lambda r: r["order"])
    assert list(long["cell_id"]) == [r["cell_id"] for r in order]
    by_id = {r["cell_id"]: r for r in rows}
    for _, row in long.iterrows():
        assert row["ba"] == pytest.approx(by_id[row["cell_id"]]["ba"])
        assert row["asr"] == pytest.approx(by_id[row["cell_id"]]["asr"])
    wide = pd.read_csv(tmp_path / "table.csv")
    assert list(wide["attack"]) == ATTACKS
    assert wide.loc[0, "refine ASR"] == expected([a for _, a in VALUES[("badnets", "refine")]])
    assert (tmp_path / "table.tex").read_text().count(r"\toprule") == 1


def test_report_page_has_table_figures_and_config(tmp_path: Path) -> None:
    write_records(tmp_path, hand_made_records())
    (tmp_path / "config.yaml").write_text("name: <demo>\nseeds: [0, 1]\n")
    figures = tmp_path / "figures"
    figures.mkdir()
    for stem in ("tradeoff-x", "tsne-y"):
        (figures / f"{stem}.png").write_bytes(b"\x89PNG")
        (figures / f"{stem}.pdf").write_bytes(b"%PDF")
    page = write_report(tmp_path).read_text()
    assert page.count("<table>") == 1 and page.count("<b>") == 2 * len(ATTACKS)
    assert 'src="figures/tradeoff-x.png"' in page and 'href="figures/tsne-y.pdf"' in page
    assert page.index("Trade-off curves") < page.index("t-SNE")
    assert "name: &lt;demo&gt;" in page and "<h1>Run &lt;demo&gt;</h1>" in page
    assert expected([a for _, a in VALUES[("badnets", "refine")]]) in page


def test_cli_report_and_plot_on_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_records(tmp_path, hand_made_records())
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").exists() and (tmp_path / "table.tex").exists()
    assert main(["plot", "tradeoff", str(tmp_path)]) == 0
    assert "no trade-off figure" in capsys.readouterr().out  # one ShrinkPad intensity only
    assert main(["plot", "tradeoff", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_cells_csv_rounds_to_four_decimals(tmp_path: Path) -> None:
    rows = hand_made_records()
    rows[0] = rows[0] | {"ba": 96.89999999999999, "asr": 12.345678}
    write_records(tmp_path, rows)
    write_tables(tmp_path)
    text = (tmp_path / "cells.csv").read_text()
    assert "96.9," in text and "12.3457," in text and "96.8999" not in text


def test_run_config_snapshot_is_read_with_aliases_bounded(tmp_path: Path) -> None:
    """The report reads a run's config.yaml for its title, t-SNE sample and Figure-2 choices; a
    tampered snapshot (an alias bomb, a non-mapping) falls back to defaults instead of hanging."""
    from bench.core.safe_yaml import run_config_snapshot

    config = tmp_path / "config.yaml"
    config.write_text("seeds: [0]\nname: 'my grid'\n")
    assert run_config_snapshot(tmp_path)["name"] == "my grid"
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    config.write_text(bomb + "name: bomb\n")
    assert run_config_snapshot(tmp_path) == {}
    config.write_text("[1, 2]\n")
    assert run_config_snapshot(tmp_path) == {}
    config.unlink()
    assert run_config_snapshot(tmp_path) == {}
