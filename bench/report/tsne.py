"""t-SNE pictures of what a defense does to the backdoored model's feature space.

For one attack, a seeded sample of benign test images (``per_class`` of each class) and of
poisoned test images (``poisoned_per_class`` of each true class, target class excluded) went
through the backdoored model behind each defense when the cell was evaluated, and the
penultimate features (after the defense's input transformation) were saved beside the cell's
record (:mod:`bench.core.tsne_sample`). This module embeds them in 2-D: it needs no model, no
data and no artifact cache. Without a defense the poisoned points collapse into one cluster beside
the target class; a defense that removes the backdoor scatters them back towards their true classes.

Panels: no defense, a low and a high intensity of every defense with an intensity knob, and
every other defense that finished (REFINE, ...), unless chosen by label. One figure per (dataset,
model, attack) of the first seed, with a CSV of its points beside it.

Every panel title also gives a number that does not depend on the embedding: the share of
poisoned samples whose nearest benign class centroid (in the original feature space) is the
target class.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tqdm.auto import tqdm

from bench.core.errors import BenchError
from bench.core.files import atomic_write_text
from bench.core.records import RecordStore
from bench.core.safe_yaml import run_config_snapshot
from bench.core.tsne_sample import CellFeatures
from bench.report.plots import FIGURE_DIR, PALETTE, intensity_param, save_figure, slug, themed

PCA_DIMS = 50  # features are reduced to this many dimensions before t-SNE (standard practice)
FILE_SUFFIXES = (".png", ".pdf", ".csv")  # what one figure consists of


@dataclass
class Panel:
    """One panel of a figure: a finished cell, or the undefended model of a grid without ``none``."""

    label: str
    source: str  # id of the cell whose features file holds this panel's features
    record: dict[str, Any] | None  # None for the undefended model of a grid without ``none``

    @property
    def reference(self) -> bool:
        """The panel shows the features saved as the undefended model's (``reference_*``)."""
        return self.record is None


@dataclass
class PanelResult:
    label: str
    embedding: np.ndarray  # (n_benign + n_poison, 2)
    poison_to_target: float  # % of poisoned samples nearest the target class centroid
    record: dict[str, Any] | None


@dataclass
class TsneFigure:
    """One figure to draw: its file stem (``.png``, ``.pdf``, ``.csv``) and its panels."""

    stem: Path
    panels: list[Panel]
    first: dict[str, Any]  # a record of the figure's (dataset, model, attack, seed)

    def files(self) -> list[Path]:
        return [self.stem.with_suffix(suffix) for suffix in FILE_SUFFIXES]


# ----------------------------------------------------------------------------- panels


def _order(record: dict[str, Any]) -> tuple:
    return tuple(record.get("order", ()))


def choose_panels(records: list[dict[str, Any]], labels: list[str] | None = None) -> list[Panel]:
    """The panels of one figure, from the finished cells of one dataset, model, attack and seed.

    Default: no defense first (for a grid without a ``none`` entry, the undefended features saved
    with the grid's first defense), then for each defense with an intensity knob its lowest
    non-zero and its highest intensity, then every knob-less defense. ``labels`` picks defense
    labels explicitly instead.
    """
    records = sorted(records, key=_order)
    if not records:
        return []
    if labels:
        by_label = {r["defense_label"]: r for r in records}
        missing = [label for label in labels if label not in by_label]
        if missing:
            raise BenchError(f"t-SNE: no finished cell with defense label {missing}; labels: {sorted(by_label)}")
        return [Panel(label, by_label[label]["cell_id"], by_label[label]) for label in labels]
    none = [r for r in records if r["defense"] == "none"]
    panels = [Panel("none", none[0]["cell_id"], none[0]) if none else Panel("none", records[0]["cell_id"], None)]
    chosen: list[dict[str, Any]] = []
    knobbed: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        if record["defense"] == "none":
            continue
        if record.get("intensity") is None:
            chosen.append(record)
            continue
        knob = intensity_param(record["defense"])
        params = record.get("defense_params") or {}
        fixed = tuple(sorted((k, repr(v)) for k, v in params.items() if k != knob))
        knobbed.setdefault((record["defense"], fixed), []).append(record)
    for group in knobbed.values():
        ranked = sorted(group, key=lambda r: r["intensity"])
        nonzero = [r for r in ranked if r["intensity"]] or ranked
        chosen += [nonzero[0]] if nonzero[0]["cell_id"] == ranked[-1]["cell_id"] else [nonzero[0], ranked[-1]]
    return panels + [Panel(r["defense_label"], r["cell_id"], r) for r in sorted(chosen, key=_order)]


def figure_plan(
    run_dir: Path,
    records: Iterable[dict[str, Any]],
    attacks: Iterable[str] | None = None,
    defenses: list[str] | None = None,
) -> list[TsneFigure]:
    """One figure per (dataset, model, attack) among the first-seed ``records``, in grid order."""
    first_seed = [r for r in records if _order(r)[4:5] == (0,)]
    wanted = set(attacks) if attacks else None
    if wanted:
        unknown = wanted - {r["attack_label"] for r in first_seed}
        if unknown:
            raise BenchError(f"t-SNE: no finished cell of an attack labelled {sorted(unknown)} in the run")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in first_seed:
        if wanted is None or record["attack_label"] in wanted:
            groups.setdefault(_order(record)[:3], []).append(record)
    figures = []
    for key in sorted(groups):
        panels = choose_panels(groups[key], defenses)
        first = min(groups[key], key=_order)
        labels = [first.get("dataset_label", first["dataset"]), first.get("model_label", first["model"]),
                  first["attack_label"]]  # fmt: skip
        stem = Path(run_dir) / FIGURE_DIR / "-".join(["tsne", *map(slug, labels)])
        figures.append(TsneFigure(stem, panels, first))
    return figures


# ----------------------------------------------------------------------------- computing


def poison_to_target(benign_f: np.ndarray, benign_y: np.ndarray, poison_f: np.ndarray, target: int) -> float:
    """% of poisoned samples whose nearest benign class centroid is the target class."""
    classes = np.unique(benign_y)
    if poison_f.shape[0] == 0 or target not in classes:
        return float("nan")
    centroids = np.stack([benign_f[benign_y == c].mean(0) for c in classes])
    nearest = classes[((poison_f[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)]
    return float((nearest == target).mean() * 100)


def embed(points: np.ndarray, seed: int) -> np.ndarray:
    """2-D t-SNE: openTSNE when installed (much faster on thousands of points), else scikit-learn."""
    points = np.asarray(points, dtype=np.float64)
    if not np.isfinite(points).all():
        raise BenchError("the saved features hold NaN or infinity; no t-SNE of them")
    if np.ptp(points, axis=0).max(initial=0.0) == 0:
        # Every input mapped to one feature vector (a defense whose output is constant): one
        # point is the faithful picture, and scikit-learn's PCA and Barnes-Hut t-SNE divide by
        # the zero variance (NaNs, then a crash of the whole process).
        return np.zeros((points.shape[0], 2))
    perplexity = float(min(30.0, max(2.0, (points.shape[0] - 1) / 3.5)))
    if points.shape[1] > PCA_DIMS and points.shape[0] > PCA_DIMS:
        from sklearn.decomposition import PCA

        points = PCA(PCA_DIMS, random_state=seed % 2**32).fit_transform(points)
    # torch's OpenMP workers keep spinning after a forward pass and starve scikit-learn's own
    # OpenMP runtime (a 60-point t-SNE went from 0.6 s to 12 s); one thread per pool while embedding.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        try:
            from openTSNE import TSNE as OpenTSNE
        except ImportError:
            from sklearn.manifold import TSNE

            tsne = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed % 2**32)
            return tsne.fit_transform(points)
        return np.asarray(OpenTSNE(2, perplexity=perplexity, random_state=seed % 2**32, n_jobs=1).fit(points))


# ----------------------------------------------------------------------------- drawing


def class_colours(n: int) -> list:
    import seaborn as sns

    return list(PALETTE) if n <= len(PALETTE) else sns.color_palette("husl", n)


def draw_panel(ax: Any, panel: PanelResult, benign_y: np.ndarray, poison_y: np.ndarray, classes: list[str],
               target: int) -> None:  # fmt: skip
    """One t-SNE panel on ``ax``: colour = true class, circle = benign, X = poisoned; centroids marked."""
    n_benign = benign_y.shape[0]
    colours = class_colours(len(classes))
    benign, poison = panel.embedding[:n_benign], panel.embedding[n_benign:]
    ax.scatter(benign[:, 0], benign[:, 1], c=[colours[c] for c in benign_y], s=9, alpha=0.55, lw=0,
               marker="o", rasterized=True)  # fmt: skip
    ax.scatter(poison[:, 0], poison[:, 1], c=[colours[c] for c in poison_y], s=30, alpha=0.9, marker="X",
               edgecolors="black", linewidths=0.4, rasterized=True)  # fmt: skip
    for c in np.unique(benign_y):
        cx, cy = benign[benign_y == c].mean(0)
        ax.scatter([cx], [cy], s=110, color=colours[c], edgecolors="black", linewidths=1.2, zorder=4)
        ax.annotate(classes[c], (cx, cy), xytext=(5, 5), textcoords="offset points", fontsize=7.5,
                    weight="bold" if c == target else "normal", zorder=5,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7})  # fmt: skip
    if poison.shape[0]:
        px, py = poison.mean(0)
        ax.scatter([px], [py], s=320, marker="*", color="black", edgecolors="white", linewidths=1.0, zorder=6)
    metrics = ""
    if panel.record is not None:
        metrics = f"BA {panel.record['ba']:.1f} · ASR {panel.record['asr']:.1f} · "
    ax.set_title(f"{panel.label}\n{metrics}poisoned in target cluster {panel.poison_to_target:.0f}%",
                 fontsize="small")  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1", fontsize="small")
    ax.set_ylabel("t-SNE 2", fontsize="small")


def legend_handles(classes: list[str]) -> list[Line2D]:
    """The legend of t-SNE panels: the classes (up to 20), benign/poisoned markers, centroids."""
    colours = class_colours(len(classes))
    handles = [Line2D([], [], ls="", marker="o", color=colours[i], label=name) for i, name in enumerate(classes)]
    if len(handles) > 20:  # too many classes to list: colours still separate them
        handles = []
    return handles + [
        Line2D([], [], ls="", marker="o", color="grey", ms=5, label="benign"),
        Line2D([], [], ls="", marker="X", color="grey", mec="black", ms=8, label="poisoned"),
        Line2D([], [], ls="", marker="o", color="white", mec="black", mew=1.2, ms=10, label="class centroid"),
        Line2D([], [], ls="", marker="*", color="black", ms=14, label="poisoned centroid"),
    ]  # fmt: skip


def tsne_figure(panels: list[PanelResult], benign_y: np.ndarray, poison_y: np.ndarray, classes: list[str], target: int,
                title: str) -> Figure:  # fmt: skip
    """One panel per defense; colour = true class, circle = benign, X = poisoned; centroids marked."""
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.9 * ncols + 1.6, 3.9 * nrows + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes, panels, strict=False):
        draw_panel(ax, panel, benign_y, poison_y, classes, target)
    fig.legend(handles=legend_handles(classes), loc="outside right center", fontsize="small", title="class / sample",
               title_fontsize="small", frameon=False)  # fmt: skip
    fig.suptitle(title, fontsize="medium")
    return fig


# ----------------------------------------------------------------------------- from a run directory


@dataclass(eq=False)
class PanelFeatures:
    """A panel's saved (benign, poisoned) features."""

    panel: Panel
    benign: np.ndarray
    poisoned: np.ndarray
    saved: CellFeatures  # the file they came from (labels, classes, target, sample settings)


def panel_features(store: RecordStore, panel: Panel) -> PanelFeatures | None:
    saved = store.read_features(panel.source)
    if saved is None:
        return None
    if not panel.reference:
        return PanelFeatures(panel, saved.benign, saved.poisoned, saved)
    if saved.reference_benign is None or saved.reference_poisoned is None:
        return None
    return PanelFeatures(panel, saved.reference_benign, saved.reference_poisoned, saved)


def configured_sample(run_dir: Path) -> tuple[int, int] | None:
    """(per_class, poisoned_per_class) of the run's ``config.yaml``; None when it names none."""
    try:
        tsne = run_config_snapshot(run_dir).get("tsne") or {}
        return int(tsne["per_class"]), int(tsne["poisoned_per_class"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def newer_than(files: list[Path], sources: list[Path]) -> bool:
    """Whether all ``files`` exist and none is older than any existing source."""
    if not all(f.is_file() for f in files):
        return False
    newest = max((p.stat().st_mtime_ns for p in sources if p.exists()), default=0)
    return min(f.stat().st_mtime_ns for f in files) >= newest


def is_up_to_date(store: RecordStore, figure: TsneFigure) -> bool:
    """Whether all of the figure's files exist, are newer than every record and features file
    they are drawn from, and show exactly its panels (a figure cut off by a killed run is not)."""
    files = figure.files()
    if not newer_than(files, [store.features_path(p.source) for p in figure.panels]
                      + [store.path(p.source) for p in figure.panels]):  # fmt: skip
        return False
    try:
        drawn = pd.read_csv(files[-1], usecols=["panel"])["panel"].astype(str)
    except (OSError, ValueError):
        return False
    return list(dict.fromkeys(drawn)) == [panel.label for panel in figure.panels]


def load_panels(store: RecordStore, figure: TsneFigure, sample: tuple[int, int] | None = None) -> list[PanelFeatures]:
    """The figure's panels whose features are saved and embed one sample: the configured one
    (``sample`` = per_class, poisoned_per_class), else the first panel's. The others are named on stderr."""
    loaded = {panel.label: panel_features(store, panel) for panel in figure.panels}
    found = [f for f in loaded.values() if f is not None]
    missing = [label for label, f in loaded.items() if f is None]
    if sample is not None:
        usable = [f for f in found if (f.saved.per_class, f.saved.poisoned_per_class) == sample]
    else:
        usable = [f for f in found if f.saved.same_sample(found[0].saved)]
    other = [f.panel.label for f in found if all(f is not u for u in usable)]
    if missing:
        print(f"warning: t-SNE {figure.stem.name}: no saved features for {missing} (computed before features "
              "were saved, or with tsne.per_class 0); rerun those cells to include them", file=sys.stderr)  # fmt: skip
    if other:
        print(f"warning: t-SNE {figure.stem.name}: {other} saved the features of another t-SNE sample than the "
              "configured one; rerun those cells to include them", file=sys.stderr)  # fmt: skip
    return usable


# An embedding depends on its points and seed only: (features file, reference?, seed) -> (2-D points, share).
EmbeddingMemo = dict[tuple[str, bool, int], tuple[np.ndarray, float]]


def embed_panels(panels: list[PanelFeatures], seed: int, desc: str, memo: EmbeddingMemo | None = None) -> list[PanelResult]:
    """Embed each panel's features (the slow part); ``memo`` lets figures drawn in one process
    (the t-SNE figures and Figure 2 show the same panels) embed each panel once."""
    memo = {} if memo is None else memo
    results = []
    for item in tqdm(panels, desc=desc, unit="panel", disable=None):
        key = (item.panel.source, item.panel.reference, seed)
        if key not in memo:
            benign, poisoned = item.benign.astype(np.float64), item.poisoned.astype(np.float64)
            share = poison_to_target(benign, item.saved.benign_labels, poisoned, item.saved.target)
            memo[key] = (embed(np.concatenate([benign, poisoned]), seed), share)
        embedding, share = memo[key]
        results.append(PanelResult(item.panel.label, embedding, share, item.panel.record))
    return results


def reuse_saved_embeddings(store: RecordStore, run_dir: Path, records: list[dict[str, Any]], memo: EmbeddingMemo) -> None:
    """Put the embeddings of the run's up-to-date t-SNE figures (their CSVs) into ``memo``, so a
    figure that shows the same panels (Figure 2) does not embed them again."""
    for figure in figure_plan(run_dir, records):
        if not is_up_to_date(store, figure):
            continue
        points = pd.read_csv(figure.stem.with_suffix(".csv"))
        seed = int(figure.first["seed"])
        for panel in figure.panels:
            key = (panel.source, panel.reference, seed)
            item = panel_features(store, panel) if key not in memo else None
            rows = points[points["panel"].astype(str) == panel.label]
            if item is None or len(rows) != item.benign.shape[0] + item.poisoned.shape[0]:
                continue
            share = poison_to_target(item.benign.astype(np.float64), item.saved.benign_labels,
                                     item.poisoned.astype(np.float64), item.saved.target)  # fmt: skip
            memo[key] = (rows[["x", "y"]].to_numpy(np.float64), share)


def draw_figure(store: RecordStore, figure: TsneFigure, sample: tuple[int, int] | None = None,
                memo: EmbeddingMemo | None = None) -> Path | None:  # fmt: skip
    """Embed and draw one figure from saved features; its PNG, or None when no panel has features."""
    panels = load_panels(store, figure, sample)
    if not panels:
        return None
    saved = panels[0].saved
    first, seed = figure.first, int(figure.first["seed"])
    results = embed_panels(panels, seed, f"t-SNE [{first['attack_label']}]", memo)
    classes, target = saved.classes, saved.target
    dataset, model = first.get("dataset_label", first["dataset"]), first.get("model_label", first["model"])
    title = (f"t-SNE of penultimate features: {first['attack_label']} on {dataset} / {model} (seed {seed}; "
             f"{len(saved.benign_labels)} benign, {len(saved.poisoned_labels)} poisoned test images; "
             f"target class {classes[target]})")  # fmt: skip
    with themed():
        fig = tsne_figure(results, saved.benign_labels, saved.poisoned_labels, classes, target, title)
        png = save_figure(fig, figure.stem)[0]
    atomic_write_text(_points_csv(results, saved), figure.stem.with_suffix(".csv"))
    return png


def write_tsne_figures(
    run_dir: Path,
    attacks: Iterable[str] | None = None,
    defenses: list[str] | None = None,
    only: set[str] | None = None,
    redraw: bool = True,
    memo: EmbeddingMemo | None = None,
) -> list[Path]:
    """Draw the run's t-SNE figures from its saved features; return the PNGs drawn.

    ``only`` restricts the records to these cell ids (the current grid). ``redraw=False`` draws
    only the figures that are missing, incomplete, or older than their records and features.
    """
    run_dir = Path(run_dir)
    store = RecordStore(run_dir)
    records = [r for r in store.read_all() if only is None or r["cell_id"] in only]
    sample = configured_sample(run_dir)
    pngs = []
    for figure in figure_plan(run_dir, records, attacks, defenses):
        if redraw or not is_up_to_date(store, figure):
            png = draw_figure(store, figure, sample, memo)
            pngs += [png] if png is not None else []
    return pngs


def _points_csv(results: list[PanelResult], saved: CellFeatures) -> str:
    """The embeddings as a long CSV, to restyle the figure without recomputing t-SNE."""
    labels = np.concatenate([saved.benign_labels, saved.poisoned_labels])
    poisoned = np.r_[np.zeros(len(saved.benign_labels), bool), np.ones(len(saved.poisoned_labels), bool)]
    frames = [pd.DataFrame({"panel": r.label, "x": r.embedding[:, 0], "y": r.embedding[:, 1],
                            "label": labels, "poisoned": poisoned}) for r in results]  # fmt: skip
    return pd.concat(frames).to_csv(index=False, float_format="%.4f")
