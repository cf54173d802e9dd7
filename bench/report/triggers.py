"""A visual check of every attack: one clean test image, its poisoned version, and their difference.

``run_bench.py show-triggers`` draws one row per attack (every registered attack with its default
parameters, or the attacks of a grid file with their parameters): the clean image, the image
with the test-time trigger, and the absolute difference stretched to full brightness, so that
even WaNet's sub-pixel warp is visible. Attacks with drawn state (WaNet's field) are fitted with
the same seed stream the grid runner uses, so the picture shows the trigger a run with that seed
would use.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from attacks.base import Attack, FitContext
from bench.core.data import DataSplit
from bench.core.device import to_float
from bench.core.files import atomic_write_bytes
from bench.core.registry import ATTACKS
from bench.core.seeding import generator


@dataclass
class TriggerExample:
    label: str
    clean: Tensor  # float (C, H, W) in [0, 1]
    poisoned: Tensor


def trigger_examples(
    attacks: list[tuple[str, Attack]], data: DataSplit, seed: int = 0, index: int = 0, target: int = 0
) -> list[TriggerExample]:
    """The ``index``-th non-target test image, clean and through each (label, attack)'s trigger."""
    candidates = torch.nonzero(data.test.y != target).flatten()
    image = data.test.x[candidates[index % candidates.numel()]][None]
    examples = []
    for label, attack in attacks:
        attack.fit(data.train, generator(seed, "attack-fit"), FitContext(torch.device("cpu")))
        poisoned = attack.apply(image)
        examples.append(TriggerExample(label, to_float(image)[0], to_float(poisoned)[0]))
    return examples


def _as_rgb(x: Tensor):
    img = x.permute(1, 2, 0).numpy()
    return img[:, :, 0] if img.shape[2] == 1 else img


def write_trigger_grid(examples: list[TriggerExample], path: Path, title: str = "") -> Path:
    """Render the examples as a PNG grid (rows: attacks; columns: clean, poisoned, |difference|)."""
    from matplotlib.figure import Figure

    rows = len(examples)
    height = 2.2 * rows + (0.5 if title else 0)
    fig = Figure(figsize=(6.6, height))
    axes = fig.subplots(rows, 3, squeeze=False)
    for row, ex in zip(axes, examples, strict=True):
        diff = (ex.poisoned - ex.clean).abs().amax(0, keepdim=True)
        peak = float(diff.max())
        panels = [(ex.clean, "clean"), (ex.poisoned, f"{ex.label}"),
                  (diff / peak if peak > 0 else diff, f"|diff| x{1 / peak:.0f}" if peak > 0 else "|diff| = 0")]  # fmt: skip
        for ax, (img, name) in zip(row, panels, strict=True):
            gray = img.shape[0] == 1
            ax.imshow(_as_rgb(img), cmap="gray" if gray else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(name, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.5 / height if title else 0)))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    path = Path(path)
    atomic_write_bytes(buffer.getvalue(), path)
    return path


def default_attacks() -> list[tuple[str, Attack]]:
    """Every registered attack with its default parameters, labelled by name."""
    return [(name, ATTACKS.create(name)) for name in ATTACKS.names()]
