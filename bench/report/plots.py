"""Figures from a run directory: one seaborn theme, PNG + PDF for every figure.

Trade-off curves come straight from the cell records (no model is touched): for every defense
with an intensity knob (``Defense.intensity_param``, e.g. ShrinkPad's ``pad``) and every attack,
BA and ASR against the knob on one 0-100 % axis, with the undefended model's BA and ASR as
dashed reference lines. The REFINE paper's argument is exactly this picture: a transformation
strong enough to break the trigger also destroys benign accuracy.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (never through pyplot's
global state), inside :func:`themed`, so plotting works headless and never changes the styling
of a caller's own figures.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from bench.core.files import atomic_write_bytes

FIGURE_DIR = "figures"
FORMATS = ("png", "pdf")
PNG_DPI = 150
# Metric colours and markers, shared by every figure (seaborn's colour-blind palette).
PALETTE = sns.color_palette("colorblind")
METRIC_STYLE = {"ba": ("BA", PALETTE[0], "o"), "asr": ("ASR", PALETTE[3], "s")}


@contextlib.contextmanager
def themed() -> Iterator[None]:
    """The seaborn theme all figures share, applied only while a figure is built and saved."""
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.95)}
    rc.update({"axes.prop_cycle": matplotlib.cycler(color=PALETTE), "savefig.bbox": "tight"})
    with matplotlib.rc_context(rc):
        yield


def slug(text: Any) -> str:
    """A file-name-safe version of a label: ``blended(alpha=0.1)`` -> ``blended-alpha-0-1``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "x"


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` atomically; return their paths."""
    written = []
    for fmt in FORMATS:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=PNG_DPI if fmt == "png" else None)
        path = stem.with_suffix(f".{fmt}")
        atomic_write_bytes(buffer.getvalue(), path)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- trade-off data


def intensity_param(defense: str) -> str | None:
    """The registered defense's knob name (None for unknown or knob-less defenses)."""
    from bench.core.registry import DEFENSES

    try:
        return DEFENSES.get(defense).intensity_param
    except Exception:  # a defense from a plugin that is not installed here: records still plot
        return None


def other_params(row: pd.Series, knob: str | None) -> dict[str, Any]:
    """The defense's parameters other than its knob: the intensities of one curve share them."""
    params = row.get("defense_params")
    return {k: v for k, v in sorted(params.items()) if k != knob} if isinstance(params, dict) else {}


def _curve_names(others: list[dict[str, Any]]) -> list[str]:
    """Name each curve of one defense by the parameters that differ between its curves (often none)."""
    varying = sorted({k for o in others for k in o if len({repr(p.get(k)) for p in others}) > 1})
    return [", ".join(f"{k}={o.get(k)}" for k in varying) for o in others]


def tradeoff_groups(df: pd.DataFrame) -> list[dict[str, Any]]:
    """One entry per (dataset, model, defense curve, attack) with at least two intensities.

    Each entry holds the defense's other parameters (``others``: shared by the curve's cells), the curve (``intensity``, mean and std of BA and ASR over seeds) and the
    no-defense reference (mean BA and ASR of the ``none`` cells of the same attack), or None.
    """
    if df.empty or "intensity" not in df.columns:
        return []
    groups = []
    knobbed = df[df["intensity"].notna()].copy()
    if knobbed.empty:
        return []
    knobbed["_knob"] = [intensity_param(d) for d in knobbed["defense"]]
    others = [other_params(r, k) for (_, r), k in zip(knobbed.iterrows(), knobbed["_knob"], strict=True)]
    knobbed["_others"] = [repr(o) for o in others]
    by_repr = dict(zip(knobbed["_others"], others, strict=True))
    names: dict[tuple[str, str], str] = {}
    for defense, reprs in knobbed.groupby("defense", sort=False)["_others"]:
        distinct = list(dict.fromkeys(reprs))
        names.update(zip([(defense, r) for r in distinct], _curve_names([by_repr[r] for r in distinct]), strict=True))
    knobbed["_fixed"] = [names[(d, r)] for d, r in zip(knobbed["defense"], knobbed["_others"], strict=True)]
    reference = df[df["defense"] == "none"]
    keys = ["dataset", "model", "defense", "_fixed", "attack_label"]
    for (dataset, model, defense, fixed, attack), cells in knobbed.groupby(keys, sort=False, dropna=False):
        if cells["intensity"].nunique() < 2:
            continue
        curve = (
            cells.groupby("intensity")[["ba", "asr"]]
            .agg(["mean", "std"])
            .sort_index()
        )
        curve.columns = [f"{m}_{s}" for m, s in curve.columns]
        ref = reference[(reference["dataset"] == dataset) & (reference["model"] == model)
                        & (reference["attack_label"] == attack)]  # fmt: skip
        groups.append({
            "dataset": dataset, "model": model, "defense": defense, "fixed": fixed,
            "others": by_repr[cells["_others"].iloc[0]],
            "knob": cells["_knob"].iloc[0] or "intensity", "attack": attack,
            "curve": curve.reset_index(), "n_seeds": int(cells["seed"].nunique()),
            "reference": None if ref.empty else {"ba": float(ref["ba"].mean()), "asr": float(ref["asr"].mean())},
        })  # fmt: skip
    return groups


# ----------------------------------------------------------------------------- trade-off figures


def tick_label(value: Any) -> str:
    """``4.0`` -> ``4``: intensities come back as floats from a column that also holds NaN."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def tradeoff_figure(group: dict[str, Any]) -> Figure:
    """BA and ASR (%) against the defense's intensity, no-defense levels dashed."""
    fig = Figure(figsize=(6.0, 4.4), layout="constrained")
    ax = fig.add_subplot()
    draw_tradeoff(ax, group)
    seeds = f", mean ± std over {group['n_seeds']} seeds" if group["n_seeds"] > 1 else ""
    ax.set_title(f"{group['defense']} vs {group['attack']}\n{group['dataset']} / {group['model']}{seeds}",
                 fontsize="medium")  # fmt: skip
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False, fontsize="small")
    return fig


def draw_tradeoff(ax: Any, group: dict[str, Any]) -> None:
    """The curves of one :func:`tradeoff_groups` entry on ``ax`` (no title, no legend)."""
    curve = group["curve"]
    x = pd.to_numeric(curve["intensity"], errors="coerce")
    if x.isna().any():  # a non-numeric knob (e.g. a mode name): evenly spaced, labelled ticks
        x = pd.Series(range(len(curve)), dtype=float)
    for metric, (name, colour, marker) in METRIC_STYLE.items():
        mean, std = curve[f"{metric}_mean"], curve[f"{metric}_std"]
        ax.plot(x, mean, marker=marker, color=colour, lw=2, ms=6, label=f"{name}, {group['defense']}")
        if group["n_seeds"] > 1:
            ax.fill_between(x, mean - std.fillna(0), mean + std.fillna(0), color=colour, alpha=0.18, lw=0)
        if group["reference"] is not None:
            ax.axhline(group["reference"][metric], color=colour, ls="--", lw=1.4, label=f"{name}, no defense")
    ax.set_ylim(-3, 103)
    ax.set_xticks(list(x), [tick_label(v) for v in curve["intensity"]])
    ax.set_xlabel(f"{group['defense']} {group['knob']}" + (f"  ({group['fixed']})" if group["fixed"] else ""))
    ax.set_ylabel("rate (%)")


def tradeoff_stem(group: dict[str, Any]) -> str:
    parts = ["tradeoff", group["dataset"], group["model"], group["defense"], group["fixed"], group["attack"]]
    return "-".join(slug(p) for p in parts if p)


def write_tradeoff_figures(run_dir: Path, records: Iterable[dict]) -> list[Path]:
    """Every trade-off figure the records allow, under ``run_dir/figures``; PNG paths returned."""
    from bench.report.tables import records_frame

    out = Path(run_dir) / FIGURE_DIR
    pngs = []
    with themed():
        for group in tradeoff_groups(records_frame(records)):
            fig = tradeoff_figure(group)
            pngs.append(save_figure(fig, out / tradeoff_stem(group))[0])
    return pngs
