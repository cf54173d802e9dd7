"""Compile a grid config into cells with content-hash ids and artifact keys, checking it whole.

Every plugin of the grid is instantiated here with its parameters (one-line errors for bad
ones), and checked against the metadata of every dataset (class count, image size, channels,
split sizes: :meth:`bench.core.data.Dataset.metadata`) -- so a grid that cannot work fails before
anything is loaded, trained or written.

Keys make caching exact. A plugin's part of a key is its identity: name, code ``version`` and
validated parameters (:meth:`bench.core.plugin.Plugin.identity`), so ``pad: 4`` and ``pad: 4.0``
share a key and bumping a plugin's version invalidates exactly what it produced.

- ``data_key``: the (attacker, defender) split: dataset (training identity), holdout, seed -- and
  the compute settings that change numbers (``threads_per_job``, ``deterministic``) when they are
  not the defaults, so that every key below it follows them.
- ``model_key``: everything that determines the backdoored model (the split, model, attack,
  poisoning settings, the model's training recipe -- the grid's ``train`` with the model entry's
  own ``train`` settings over it). Defenses that share it share one trained model.
- ``defense_key``: the model key plus the defense's identity -- without the intensity knob when
  the knob does not change the fitted state -- for trainable defenses.
- ``cell_id``: the model key plus the defense's full identity: one JSON record per id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.core.data import Dataset, resolve_data_root
from bench.core.errors import BenchError
from bench.core.files import stable_hash
from bench.core.params import PluginParams
from bench.core.plugin import DatasetMeta
from bench.core.registry import ATTACKS, DATASETS, DEFENSES, MODELS
from bench.nn.train import TrainRecipe
from bench.orchestration.config import GridConfig, PluginSpec, recipe_json
from defenses.base import Defense

# Bump when a change to the harness (splits, poisoning, training loop) alters what a cached
# artifact would contain; a change to one plugin bumps that plugin's own ``version`` instead.
ARTIFACT_VERSION = 2


@dataclass(frozen=True)
class Cell:
    """One (dataset, model, attack, defense, seed) combination of the grid."""

    cell_id: str
    dataset: PluginSpec
    model: PluginSpec
    attack: PluginSpec
    defense: PluginSpec
    seed: int
    model_key: str
    defense_key: str | None
    attack_params: dict[str, Any] = field(hash=False)
    defense_params: dict[str, Any] = field(hash=False)
    intensity: Any = None
    order: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    data_key: str = ""
    clean_model_key: str = ""  # the ``clean`` reference model of this cell's split (clean-label attacks)

    @property
    def defense_label(self) -> str:
        return self.defense.display()

    @property
    def attack_label(self) -> str:
        return self.attack.display()


def expand_defenses(specs: list[PluginSpec]) -> list[PluginSpec]:
    """A list value for a defense's intensity parameter becomes one spec per value."""
    out: list[PluginSpec] = []
    for spec in specs:
        knob = DEFENSES.get(spec.name).intensity_param
        values = spec.params.get(knob) if knob else None
        if isinstance(values, list):
            if not values:
                raise BenchError(f"defense {spec.name!r}: the list of {knob} values is empty")
            for value in values:
                label = f"{spec.label}({knob}={value})" if spec.label else None
                out.append(spec.model_copy(update={"params": {**spec.params, knob: value}, "label": label}))
        else:
            out.append(spec)
    return out


def _normalised(spec: PluginSpec, params: PluginParams) -> PluginSpec:
    """The spec with its given parameters replaced by their validated values (``4.0`` -> ``4``),
    so that labels and records show what the plugin uses."""
    values = params.model_dump(mode="json")
    return spec.model_copy(update={"params": {k: values[k] for k in spec.params}})


def check_data(config: GridConfig, meta: DatasetMeta) -> None:
    """What the grid's own settings need from a dataset: two classes and the target among them."""
    if meta.num_classes < 2:
        raise BenchError(f"dataset {meta.name!r} has {meta.num_classes} class; a backdoor benchmark needs at least 2")
    target = config.poison.target
    if not 0 <= target < meta.num_classes:
        raise BenchError(f"poison.target {target} is not a class of dataset {meta.name!r} "
                         f"({meta.num_classes} classes: 0 to {meta.num_classes - 1})")  # fmt: skip


def check_report(config: GridConfig, defenses: list[tuple[PluginSpec, Defense]]) -> None:
    """``report.figure2`` names swept defenses and intensities the grid computes.

    A low or high intensity that no cell has would leave its t-SNE panel empty: the value is
    compared with the swept values after the defense's own validation (``pad: 4.0`` is ``4``).
    """
    for name, choice in config.report.figure2.items():
        swept = [d for _, d in defenses if d.name == name and d.intensity_param]
        if not swept:
            knobbed = sorted({d.name for _, d in defenses if d.intensity_param})
            raise BenchError(f"report.figure2.{name}: no defense {name!r} with an intensity knob in the grid "
                             f"(swept defenses here: {', '.join(knobbed) or 'none'})")  # fmt: skip
        knob = swept[0].intensity_param
        values = sorted({d.intensity for d in swept})
        for which in ("low", "high"):
            value = getattr(choice, which)
            if value is None:
                continue
            try:
                wanted = DEFENSES.create(name, {knob: value}).intensity
            except BenchError as err:
                raise BenchError(f"report.figure2.{name}.{which}: {err}") from None
            if wanted not in values:
                raise BenchError(f"report.figure2.{name}.{which}: {knob} {wanted} is not among the grid's values "
                                 f"{values}")  # fmt: skip


def _holdout_count(config: GridConfig, meta: DatasetMeta) -> int | None:
    return None if meta.train_size is None else round(config.holdout * meta.train_size)


def compile_grid(config: GridConfig, data_root: str | Path | None = None) -> list[Cell]:
    """All cells of the grid, in config order (dataset, model, attack, defense, seed).

    Instantiates every plugin and checks it against every dataset's metadata (read from
    ``data_root`` where a dataset needs files, e.g. an image folder) before any work.
    """
    root = resolve_data_root(data_root)
    datasets: list[tuple[PluginSpec, Dataset]] = []
    for spec in config.datasets:
        dataset: Dataset = DATASETS.create(spec.name, spec.params)
        datasets.append((_normalised(spec, dataset.params), dataset))
    models = []
    for spec in config.models:
        cls = MODELS.get(spec.name)
        params = cls.parse_params(spec.params)
        models.append((_normalised(spec, params), cls, params))
    attacks = []
    for spec in config.attacks:
        attack = ATTACKS.create(spec.name, spec.params)
        attacks.append((_normalised(spec, attack.params), attack))
    defenses: list[tuple[PluginSpec, Defense]] = []
    for spec in expand_defenses(config.defenses):
        defense = DEFENSES.create(spec.name, spec.params)
        defenses.append((_normalised(spec, defense.params), defense))
    check_report(config, defenses)
    labels = [spec.display() for spec, _ in defenses]
    if len(set(labels)) != len(labels):
        raise BenchError(f"two defense entries have the same label {labels}; give them distinct 'label's")

    for _, dataset in datasets:
        meta = dataset.metadata(root)
        check_data(config, meta)
        for _, cls, params in models:
            with torch.random.fork_rng(devices=[]):  # building it must not move the global RNG
                model = cls(num_classes=meta.num_classes, in_channels=meta.channels, params=params)
            model.check(meta)
        for _, attack in attacks:
            attack.check(meta)
        holdout = _holdout_count(config, meta)
        for _, defense in defenses:
            defense.check(meta)
            if holdout is not None and meta.train_size is not None:
                defense.benign_count(meta.train_size, holdout)

    clean = ATTACKS.create("clean")
    cells: list[Cell] = []
    for di, (dataset_spec, dataset) in enumerate(datasets):
        test_subset = dataset.params.test_subset
        evaluation = {"eval_test_subset": test_subset} if test_subset else {}
        if not config.eval_amp:  # fp32 evaluation on CUDA: other numbers (the default keeps its ids)
            evaluation["eval_amp"] = False
        for mi, (model_spec, model_cls, model_params) in enumerate(models):
            model_id = model_cls.identity_of(model_params)
            recipe = config.train_for(model_spec)
            for ai, (attack_spec, attack) in enumerate(attacks):
                for si, seed in enumerate(config.seeds):
                    data_key = stable_hash({"v": ARTIFACT_VERSION, "dataset": dataset.training_identity(),
                                            "holdout": config.holdout, "seed": seed,
                                            **config.compute_identity()})  # fmt: skip
                    key = model_key(config, data_key, model_id, attack.identity(), recipe)
                    clean_key = model_key(config, data_key, model_id, clean.identity(), recipe)
                    for fi, (spec, defense) in enumerate(defenses):
                        knob = defense.intensity_param
                        fit_exclude = (knob,) if knob and not defense.intensity_affects_fit else ()
                        defense_key = (stable_hash({"model": key, "defense": defense.identity(exclude=fit_exclude)})
                                       if defense.trainable else None)  # fmt: skip
                        cells.append(Cell(
                            cell_id=stable_hash({"model": key, "defense": defense.identity(), **evaluation}),
                            dataset=dataset_spec, model=model_spec, attack=attack_spec, defense=spec, seed=seed,
                            model_key=key, defense_key=defense_key,
                            attack_params=attack.describe(), defense_params=defense.describe(),
                            intensity=defense.intensity, order=(di, mi, ai, fi, si),
                            data_key=data_key, clean_model_key=clean_key,
                        ))  # fmt: skip
    return cells


def model_key(
    config: GridConfig, data_key: str, model: dict[str, Any], attack: dict[str, Any], recipe: TrainRecipe
) -> str:
    """The content hash of the model trained on the split ``data_key`` under ``config``.

    ``model`` and ``attack`` are plugin identities and ``recipe`` the model's training recipe
    (:meth:`GridConfig.train_for`: the grid's, with the model entry's own settings over it); the
    ``clean`` reference attack's key is the clean model that clean-label attacks craft their
    poison with, so it is trained once and shared with the grid's ``clean`` row.
    """
    return stable_hash({
        "v": ARTIFACT_VERSION,
        "data": data_key,
        "poison": config.poison.identity(),
        "train": recipe_json(recipe),
        "model": model,
        "attack": attack,
    })  # fmt: skip
