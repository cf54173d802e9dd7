"""Compile a grid config into cells with content-hash ids and artifact keys.

Three keys make caching exact:

- ``model_key``: everything that determines the backdoored model (dataset, model, the attack's
  resolved parameters, poisoning settings, training recipe, holdout, seed). Defenses that share
  it share one trained model.
- ``defense_key``: the model key plus the defense's resolved parameters -- without the intensity
  knob when the knob does not change the fitted state -- for trainable defenses.
- ``cell_id``: the model key plus the defense's full parameters: one JSON record per id.

Plugins are instantiated here, so a bad parameter fails before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.core.errors import BenchError
from bench.core.files import stable_hash
from bench.core.registry import ATTACKS, DATASETS, DEFENSES, MODELS
from bench.orchestration.config import GridConfig, PluginSpec

# Bump when a change to the code alters what a cached artifact would contain.
ARTIFACT_VERSION = 1


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

    @property
    def defense_label(self) -> str:
        return self.defense.display()

    @property
    def attack_label(self) -> str:
        return self.attack.display()


def instantiate(registry: Any, spec: PluginSpec) -> Any:
    """Build a plugin from its spec; a bad parameter becomes a one-line :class:`BenchError`."""
    cls = registry.get(spec.name)
    try:
        return cls(**spec.params)
    except TypeError as err:
        raise BenchError(f"{registry.kind} {spec.name!r}: {err}") from None


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


def _training_data(dataset: PluginSpec) -> dict[str, Any]:
    """The dataset entry as far as training sees it: ``test_subset`` only changes the evaluation,
    so grids that evaluate on a test subset share their models with full-test-set grids."""
    spec = dataset.model_dump(exclude={"label"})
    spec["params"] = {k: v for k, v in spec["params"].items() if k != "test_subset"}
    return spec


def model_key(
    config: GridConfig, dataset: PluginSpec, model: PluginSpec, attack: str, attack_params: dict[str, Any], seed: int
) -> str:
    """The content hash of the model trained for (dataset, model, attack, seed) under ``config``."""
    return stable_hash({
        "v": ARTIFACT_VERSION,
        "poison": config.poison.model_dump(),
        "train": config.resolved()["train"],
        "holdout": config.holdout,
        "dataset": _training_data(dataset),
        "model": model.model_dump(exclude={"label"}),
        "attack": {"name": attack, **attack_params},
        "seed": seed,
    })  # fmt: skip


def clean_model_key(config: GridConfig, dataset: PluginSpec, model: PluginSpec, seed: int) -> str:
    """The key of the ``clean`` reference attack's model: the same recipe on unpoisoned data.

    A clean-label attack's clean model (``FitContext.train_clean_model``) is this model, so it is
    trained once and shared with the grid's ``clean`` row instead of once per attack setting.
    """
    return model_key(config, dataset, model, "clean", instantiate(ATTACKS, PluginSpec(name="clean")).describe(), seed)


def compile_grid(config: GridConfig) -> list[Cell]:
    """All cells of the grid, in config order (dataset, model, attack, defense, seed)."""
    for spec in config.datasets:
        DATASETS.get(spec.name)
    for spec in config.models:
        MODELS.get(spec.name)
    attacks = [(spec, instantiate(ATTACKS, spec).describe()) for spec in config.attacks]
    defense_specs = expand_defenses(config.defenses)
    defenses = [(spec, instantiate(DEFENSES, spec)) for spec in defense_specs]
    labels = [spec.display() for spec in defense_specs]
    if len(set(labels)) != len(labels):
        raise BenchError(f"two defense entries have the same label {labels}; give them distinct 'label's")
    cells: list[Cell] = []
    for di, dataset in enumerate(config.datasets):
        for mi, model in enumerate(config.models):
            for ai, (attack, attack_params) in enumerate(attacks):
                for si, seed in enumerate(config.seeds):
                    key = model_key(config, dataset, model, attack.name, attack_params, seed)
                    test_subset = dataset.params.get("test_subset")
                    evaluation = {"eval_test_subset": test_subset} if test_subset else {}
                    for fi, (spec, defense) in enumerate(defenses):
                        params = defense.describe()
                        fit_params = dict(params)
                        if defense.intensity_param and not defense.intensity_affects_fit:
                            fit_params.pop(defense.intensity_param, None)
                        defense_key = (
                            stable_hash({"model": key, "defense": spec.name, **fit_params})
                            if defense.trainable
                            else None
                        )
                        cells.append(Cell(
                            cell_id=stable_hash({"model": key, "defense": spec.name, **params, **evaluation}),
                            dataset=dataset, model=model, attack=attack, defense=spec, seed=seed,
                            model_key=key, defense_key=defense_key,
                            attack_params=attack_params, defense_params=params,
                            intensity=defense.intensity, order=(di, mi, ai, fi, si),
                        ))  # fmt: skip
    return cells
