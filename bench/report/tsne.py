"""t-SNE pictures of what a defense does to the backdoored model's feature space.

For one attack, a seeded sample of benign test images (``per_class`` of each class) and of
poisoned test images (``poisoned_per_class`` of each true class, target class excluded) goes
through the backdoored model behind each defense; the penultimate features
(:meth:`defenses.base.Defense.features`, i.e. after the defense's input transformation) are
embedded in 2-D. Without a defense the poisoned points collapse into one cluster beside the
target class; a defense that removes the backdoor scatters them back towards their true classes.

Panels: no defense, a low and a high intensity of every defense with an intensity knob, and
every other defense in the grid at its configured setting (REFINE, ...), unless chosen by label.
The models and fitted defense states come from the artifact cache of the run: nothing is trained.

Every panel title also gives a number that does not depend on the embedding: the share of
poisoned samples whose nearest benign class centroid (in the original feature space) is the
target class.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor
from tqdm.auto import tqdm

from bench.core.data import DataPaths, ImageSet
from bench.core.device import resolve_device, to_float
from bench.core.errors import BenchError
from bench.core.files import atomic_write_text
from bench.core.records import RecordStore
from bench.core.seeding import generator
from bench.orchestration.config import GridConfig, PluginSpec, read_yaml, validate
from bench.orchestration.grid import Cell, compile_grid
from bench.orchestration.store import ArtifactStore
from bench.report.plots import FIGURE_DIR, PALETTE, save_figure, slug, themed

PCA_DIMS = 50  # features are reduced to this many dimensions before t-SNE (standard practice)


@dataclass
class TsneSample:
    """The images every panel of one figure embeds (the same ones in every panel)."""

    benign_x: Tensor
    benign_y: Tensor
    poison_x: Tensor
    poison_y: Tensor  # true labels of the poisoned images


@dataclass
class PanelResult:
    label: str
    embedding: np.ndarray  # (n_benign + n_poison, 2)
    poison_to_target: float  # % of poisoned samples nearest the target class centroid
    record: dict[str, Any] | None


# ----------------------------------------------------------------------------- sampling


def per_class_index(y: Tensor, count: int, gen: torch.Generator) -> Tensor:
    """Up to ``count`` random indices of each class present in ``y``, sorted."""
    picks = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        picks.append(idx[torch.randperm(idx.numel(), generator=gen)[:count]])
    return torch.sort(torch.cat(picks)).values if picks else torch.empty(0, dtype=torch.long)


def draw_sample(test: ImageSet, attack: Any, target: int, per_class: int, poisoned_per_class: int,
                seed: int) -> TsneSample:  # fmt: skip
    """Seeded benign and poisoned test samples, balanced over classes."""
    gen = generator(seed, "tsne")
    benign = per_class_index(test.y, per_class, gen)
    poison_x, poison_y = attack.poison_test(test, target)
    poisoned = per_class_index(poison_y, poisoned_per_class, gen)
    return TsneSample(test.x[benign], test.y[benign], poison_x[poisoned], poison_y[poisoned])


# ----------------------------------------------------------------------------- panels


def choose_panels(cells: list[Cell], labels: list[str] | None = None) -> list[Cell]:
    """The cells (of one dataset, model, attack and seed) whose defenses get a panel.

    Default: no defense first (made up from any cell when the grid has no ``none`` entry), then
    for each defense with an intensity knob its lowest non-zero and its highest intensity, then
    every knob-less defense. ``labels`` picks defense labels explicitly instead.
    """
    if not cells:
        return []
    if labels:
        by_label = {c.defense_label: c for c in cells}
        missing = [label for label in labels if label not in by_label]
        if missing:
            raise BenchError(f"t-SNE: no defense labelled {missing} in the grid; labels: {sorted(by_label)}")
        return [by_label[label] for label in labels]
    none = [c for c in cells if c.defense.name == "none"]
    panels = none[:1] or [dataclasses.replace(cells[0], defense=PluginSpec(name="none"), defense_key=None,
                                              defense_params={}, intensity=None, cell_id="")]  # fmt: skip
    knobbed: dict[tuple, list[Cell]] = {}
    for cell in cells:
        if cell.defense.name == "none":
            continue
        if cell.intensity is None:
            panels.append(cell)
            continue
        from bench.core.registry import DEFENSES

        knob = DEFENSES.get(cell.defense.name).intensity_param
        fixed = tuple(sorted((k, repr(v)) for k, v in cell.defense_params.items() if k != knob))
        knobbed.setdefault((cell.defense.name, fixed), []).append(cell)
    for group in knobbed.values():
        ranked = sorted(group, key=lambda c: c.intensity)
        nonzero = [c for c in ranked if c.intensity] or ranked
        panels += [nonzero[0]] if nonzero[0].cell_id == ranked[-1].cell_id else [nonzero[0], ranked[-1]]
    return sorted(panels, key=lambda c: c.order)


# ----------------------------------------------------------------------------- computing


@torch.no_grad()
def features(defense: Any, images: Tensor, device: torch.device, batch_size: int = 512) -> np.ndarray:
    """Penultimate features of the defended model for uint8 ``images``."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = to_float(images[start : start + batch_size].to(device))
        out.append(defense.features(x).flatten(1).float().cpu())
    return torch.cat(out).numpy()


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


def tsne_figure(panels: list[PanelResult], sample: TsneSample, classes: list[str], target: int, title: str) -> Figure:
    """One panel per defense; colour = true class, circle = benign, X = poisoned; centroids marked."""
    benign_y = sample.benign_y.numpy()
    poison_y = sample.poison_y.numpy()
    n_benign = benign_y.shape[0]
    colours = class_colours(len(classes))
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.9 * ncols + 1.6, 3.9 * nrows + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes, panels, strict=False):
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
    handles = [Line2D([], [], ls="", marker="o", color=colours[i], label=name) for i, name in enumerate(classes)]
    if len(handles) > 20:  # too many classes to list: colours still separate them
        handles = []
    handles += [
        Line2D([], [], ls="", marker="o", color="grey", ms=5, label="benign"),
        Line2D([], [], ls="", marker="X", color="grey", mec="black", ms=8, label="poisoned"),
        Line2D([], [], ls="", marker="o", color="white", mec="black", mew=1.2, ms=10, label="class centroid"),
        Line2D([], [], ls="", marker="*", color="black", ms=14, label="poisoned centroid"),
    ]  # fmt: skip
    fig.legend(handles=handles, loc="outside right center", fontsize="small", title="class / sample",
               title_fontsize="small", frameon=False)  # fmt: skip
    fig.suptitle(title, fontsize="medium")
    return fig


# ----------------------------------------------------------------------------- from a run directory


def load_run_config(run_dir: Path) -> GridConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise BenchError(f"{run_dir} has no config.yaml; is it a run directory written by 'run'?")
    return validate(read_yaml(path), str(path))


def _require_cached(runner: Any, cell: Cell) -> None:
    """t-SNE only reads the cache: training here would silently redo the run's work."""
    store: ArtifactStore = runner.artifacts
    if not store.path("models", cell.model_key).exists():
        raise BenchError(
            f"t-SNE: the backdoored model for {cell.attack_label} is not in the artifact cache {store.root}; "
            "pass the --cache-dir the run used (or rerun the grid)"
        )
    if cell.defense_key and not store.path("defenses", cell.defense_key).exists():
        raise BenchError(f"t-SNE: the fitted state of defense {cell.defense_label} is not in the cache {store.root}")


def write_tsne_figures(
    run_dir: Path,
    paths: DataPaths,
    device: str | None = None,
    attacks: Iterable[str] | None = None,
    defenses: list[str] | None = None,
    per_class: int = 200,
    poisoned_per_class: int = 50,
) -> list[Path]:
    """One t-SNE figure per (dataset, model, attack) of the run (first seed); PNG paths returned."""
    from bench.orchestration.runner import CellRunner

    if per_class < 1 or poisoned_per_class < 0:
        raise BenchError("t-SNE: per_class must be >= 1 and poisoned_per_class >= 0")
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    cells = [c for c in compile_grid(config) if c.seed == config.seeds[0]]
    wanted = set(attacks) if attacks else None
    if wanted:
        unknown = wanted - {c.attack_label for c in cells}
        if unknown:
            raise BenchError(f"t-SNE: no attack labelled {sorted(unknown)} in the grid")
    records = {r["cell_id"]: r for r in RecordStore(run_dir).read_all()}
    dev = resolve_device(device or config.device)
    runner = CellRunner(config, paths, ArtifactStore(paths.cache_dir), dev)
    target = config.poison.target
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        if wanted is None or cell.attack_label in wanted:
            groups.setdefault((cell.order[0], cell.order[1], cell.order[2]), []).append(cell)
    pngs = []
    for group in groups.values():
        if not defenses:  # default panels: only cells that finished (a failed cell has no fitted state)
            group = [c for c in group if c.cell_id in records]
            if not group:
                continue
        panels = choose_panels(group, defenses)
        first = panels[0]
        for cell in panels:
            _require_cached(runner, cell)
        data = runner.cell_data(first)
        attack = runner.fitted_attack(first, data)
        sample = draw_sample(data.test, attack, target, per_class, poisoned_per_class, first.seed)
        model, _ = runner.backdoored_model(first, data, attack)
        results = []
        for cell in tqdm(panels, desc=f"t-SNE [{first.attack_label}]", unit="panel", disable=None):
            defense, _ = runner.defense(cell, data, model)
            benign_f = features(defense, sample.benign_x, dev, config.eval_batch_size)
            poison_f = features(defense, sample.poison_x, dev, config.eval_batch_size)
            share = poison_to_target(benign_f, sample.benign_y.numpy(), poison_f, target)
            points = np.concatenate([benign_f, poison_f])
            results.append(PanelResult(cell.defense_label, embed(points, first.seed), share, records.get(cell.cell_id)))
        classes = data.test.classes
        title = (f"t-SNE of penultimate features: {first.attack_label} on {first.dataset.display()} / "
                 f"{first.model.display()} (seed {first.seed}; {len(sample.benign_y)} benign, "
                 f"{len(sample.poison_y)} poisoned test images; target class {classes[target]})")  # fmt: skip
        stem = run_dir / FIGURE_DIR / "-".join(
            ["tsne", slug(first.dataset.display()), slug(first.model.display()), slug(first.attack_label)])
        with themed():
            pngs.append(save_figure(tsne_figure(results, sample, classes, target, title), stem)[0])
        atomic_write_text(_points_csv(results, sample), stem.with_suffix(".csv"))
    return pngs


def _points_csv(results: list[PanelResult], sample: TsneSample) -> str:
    """The embeddings as a long CSV, to restyle the figure without recomputing t-SNE."""
    labels = np.concatenate([sample.benign_y.numpy(), sample.poison_y.numpy()])
    poisoned = np.r_[np.zeros(len(sample.benign_y), bool), np.ones(len(sample.poison_y), bool)]
    frames = [pd.DataFrame({"panel": r.label, "x": r.embedding[:, 0], "y": r.embedding[:, 1],
                            "label": labels, "poisoned": poisoned}) for r in results]  # fmt: skip
    return pd.concat(frames).to_csv(index=False, float_format="%.4f")
