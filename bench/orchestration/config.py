"""Grid configuration: YAML in, a validated :class:`GridConfig` out.

A grid file lists datasets, models, attacks, defenses and seeds; the grid is their product. A
plugin entry is either a bare name (``badnets``) or a mapping with ``name`` and parameters
(``{name: shrinkpad, pad: [2, 4, 8]}``); a list given for a defense's intensity parameter
expands into one grid column per value. Validation (pydantic) happens before any work starts,
and every problem is reported as one line naming the file and the offending key. Plugin
parameters are validated by each plugin's own ``Params`` when the grid is compiled
(:mod:`bench.orchestration.grid`); non-finite numbers are refused anywhere in the file.

YAML anchors and merge keys (``&refine`` ... ``<<: *refine``) are welcome, but aliases may not
expand the document beyond :data:`bench.core.safe_yaml.MAX_YAML_NODES` values: a few hundred bytes of nested aliases
("billion laughs") would otherwise expand into billions of values downstream. A grid's name
names its run directory (``results/<name>``), so it is a plain slug, and a grid lists each
dataset, model, attack and seed once (a repeated entry would silently merge into the same cells).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from attacks.base import PoisonPool
from bench.core.determinism import Deterministic
from bench.core.errors import BenchError
from bench.core.params import validation_error_line
from bench.core.safe_yaml import YamlTooLarge, safe_load_bounded
from bench.nn.train import TrainRecipe

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")  # a run name: one plain path component
MAX_NAME_LENGTH = 100


class PluginSpec(BaseModel):
    """A registered name plus its parameters, and an optional display label."""

    value_phrase: ClassVar[tuple[str, str]] = ("a plugin name or {name: ..., parameters}", "plugin entries")
    # Keys of an entry that are settings of the entry itself, not parameters of the plugin.
    entry_keys: ClassVar[tuple[str, ...]] = ()
    model_config = ConfigDict(extra="forbid")
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict) and "params" not in value:
            own = ("name", "label", *cls.entry_keys)
            rest = {k: v for k, v in value.items() if k not in own}
            entry = {k: value[k] for k in cls.entry_keys if k in value}
            return {"name": value.get("name"), "label": value.get("label"), **entry, "params": rest}
        return value

    def identity_key(self) -> str:
        """What makes two entries of one list the same entry (their cells would merge)."""
        return json.dumps([self.name, self.params], sort_keys=True, default=str)

    def display(self) -> str:
        if self.label:
            return self.label
        if not self.params:
            return self.name
        return f"{self.name}(" + ", ".join(f"{k}={v}" for k, v in sorted(self.params.items())) + ")"


class ModelSpec(PluginSpec):
    """A model entry; ``train`` holds training settings of this model's own, merged over the grid's
    ``train`` (``{name: vgg16, train: {lr: 0.01}}``: the paper trains VGG-16 at lr 0.01 where the
    other CNNs use 0.1). The merged recipe is the one that enters the model's cache key."""

    value_phrase: ClassVar[tuple[str, str]] = (
        "a model name or {name: ..., parameters, train: {...}}", "model entries")
    entry_keys: ClassVar[tuple[str, ...]] = ("train",)
    train: dict[str, Any] = Field(default_factory=dict)

    def identity_key(self) -> str:
        """Name, parameters and training overrides: the same model only if all three agree."""
        return json.dumps([self.name, self.params, self.train], sort_keys=True, default=str)


class PoisonSettings(BaseModel):
    """The poisoning every attack of the grid applies (attacks with their own rate override it).

    ``pool``: where all-to-one attacks draw their poisoned samples -- ``non_target`` (the
    default: every poisoned sample is relabelled) or ``all``, the convention of BackdoorBox and
    the REFINE code (a drawn target-class sample gets the trigger and keeps its label).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    rate: float = Field(0.1, gt=0, lt=1)
    target: int = Field(0, ge=0)  # checked against each dataset's classes when the grid compiles
    pool: PoisonPool = "non_target"

    def identity(self) -> dict[str, Any]:
        """The settings as they enter a model's cache key; the default pool is left out, so that
        grids written before the pool existed keep their cached models."""
        values = self.model_dump(mode="json")
        if self.pool == "non_target":
            del values["pool"]
        return values


class TsneSettings(BaseModel):
    """The t-SNE sample every cell saves the features of (see :mod:`bench.core.tsne_sample`).

    The sample is drawn when a cell is computed, so a change here applies to cells computed
    after it; ``per_class: 0`` saves no features (and so draws no t-SNE figure).
    """

    model_config = ConfigDict(extra="forbid")
    per_class: int = Field(200, ge=0, description="benign test images per class")
    poisoned_per_class: int = Field(50, ge=0, description="poisoned test images per true class")


class IllustrationSettings(BaseModel):
    """How many poisoned test images a cell passes to its defense's illustration hook
    (:meth:`defenses.base.Defense.illustrations`; BTI-DBF's inverted and purified images)."""

    model_config = ConfigDict(extra="forbid")
    count: int = Field(8, ge=0, le=256, description="poisoned test images per cell of the first seed; 0: none")


class IntensityChoice(BaseModel):
    """The low and high intensity of one defense's Figure-2 t-SNE panels (None: the default)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    low: float | None = Field(None, description="low intensity; default: the smallest swept non-zero value")
    high: float | None = Field(None, description="high intensity; default: the largest swept value")

    @model_validator(mode="after")
    def _ordered(self) -> IntensityChoice:
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"low must be smaller than high, got low {self.low} and high {self.high}")
        return self


class ReportSettings(BaseModel):
    """Choices of the report's composed figures (checked against the grid when it compiles).

    ``figure2`` maps a defense name with an intensity knob to the intensities of its t-SNE panels
    in the Figure-2 composition (trade-off curve beside t-SNE at no defense, low and high).
    """

    model_config = ConfigDict(extra="forbid")
    figure2: dict[str, IntensityChoice] = Field(default_factory=dict)


class GridConfig(BaseModel):
    """A whole grid: the lists whose product is the set of cells, plus shared settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str | None = None
    datasets: list[PluginSpec] = Field(min_length=1)
    models: list[ModelSpec] = Field(min_length=1)
    attacks: list[PluginSpec] = Field(min_length=1)
    defenses: list[PluginSpec] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    poison: PoisonSettings = Field(default_factory=PoisonSettings)
    train: TrainRecipe = Field(default_factory=TrainRecipe)
    # Fraction of the training set held out as the defender's clean data; the attacker never
    # sees (or poisons) it and the backdoored model is not trained on it.
    holdout: float = Field(0.2, ge=0, lt=1)
    eval_batch_size: int = Field(1024, ge=1)
    # bf16 autocast while evaluating on CUDA (false: fp32 there too); the CPU evaluates in fp32.
    eval_amp: bool = True
    device: str = "auto"
    # Intra-op threads of every job, whatever the machine: a job's numbers depend on it (float
    # reductions split over threads), so it is part of the experiment, not of the machine.
    threads_per_job: int = Field(1, ge=1)
    # torch's deterministic algorithms (and cuDNN without autotuning) for every job; "warn" keeps
    # running ops that have no deterministic CUDA kernel and warns. No effect on CPU numbers.
    deterministic: Deterministic = False
    tsne: TsneSettings = Field(default_factory=TsneSettings)
    illustrations: IllustrationSettings = Field(default_factory=IllustrationSettings)
    report: ReportSettings = Field(default_factory=ReportSettings)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and (not NAME_PATTERN.match(v) or len(v) > MAX_NAME_LENGTH):
            raise ValueError(f"must be a plain name of letters, digits, '.', '_' and '-' (not starting with '.' "
                             f"or '-', at most {MAX_NAME_LENGTH} characters): it names the run directory "
                             f"results/<name>; got {v!r}")  # fmt: skip
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        repeated = sorted({seed for seed in v if v.count(seed) > 1})
        if repeated:
            raise ValueError(f"seed {repeated[0]} is listed twice; list each seed once")
        return v

    @field_validator("datasets", "models", "attacks")
    @classmethod
    def _distinct_entries(cls, v: list[PluginSpec]) -> list[PluginSpec]:
        """Two equal entries would be the same cells, merged silently and counted twice."""
        seen: dict[str, PluginSpec] = {}
        labels: dict[str, PluginSpec] = {}
        for spec in v:
            key = spec.identity_key()
            if key in seen:
                raise ValueError(f"{spec.display()!r} is listed twice; list each entry once")
            if spec.display() in labels:
                raise ValueError(f"two entries have the same label {spec.display()!r}; give them distinct 'label's")
            seen[key] = labels[spec.display()] = spec
        return v

    @field_validator("deterministic", mode="before")
    @classmethod
    def _deterministic(cls, v: Any) -> Any:
        if isinstance(v, bool) or v == "warn":
            return v
        raise ValueError(f"must be true, false or warn, got {v!r}")

    @model_validator(mode="after")
    def _model_recipes(self) -> "GridConfig":
        """Every model's merged training recipe must be valid (checked here, before any work)."""
        for i, spec in enumerate(self.models):
            self.train_for(spec, where=f"models[{i}].train")
        return self

    def train_for(self, model: PluginSpec, where: str | None = None) -> TrainRecipe:
        """The training recipe of ``model``: the grid's ``train`` with the entry's own ``train`` over it."""
        overrides = getattr(model, "train", None)
        if not overrides:
            return self.train
        merged = {**recipe_json(self.train), **overrides}
        try:
            return _RECIPE.validate_python(merged)
        except ValidationError as err:
            owner = where or f"model {model.name!r}: train"
            raise ValueError(validation_error_line(err, TrainRecipe, merged, owner, unknown="setting")) from None

    def compute_identity(self) -> dict[str, Any]:
        """The compute settings that can change a job's numbers, for the artifact keys: a model
        trained with two threads per job is a different float result from one trained with one,
        and must not be served from the cache to a grid that asks for one. Defaults are left out,
        so grids that keep them keep their keys."""
        identity: dict[str, Any] = {}
        if self.threads_per_job != 1:
            identity["threads_per_job"] = self.threads_per_job
        if self.deterministic is not False:  # no effect on CPU numbers, but on CUDA kernels
            identity["deterministic"] = self.deterministic
        return identity

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


_RECIPE = TypeAdapter(TrainRecipe)


def recipe_json(recipe: TrainRecipe) -> dict[str, Any]:
    """A training recipe as plain JSON values (its part of a model's cache key and record)."""
    return _RECIPE.dump_python(recipe, mode="json")


# ---------------------------------------------------------------------------- loading

def default_name(path: Path) -> str:
    """A run name from a config file's name: its stem with anything but ``[A-Za-z0-9._-]`` as '-'."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).lstrip(".-")[:MAX_NAME_LENGTH]
    return slug or "grid"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """``key.sub=value`` strings -> (key, YAML-parsed value) pairs."""
    pairs = []
    for item in overrides or []:
        if "=" not in item:
            raise BenchError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = safe_load_bounded(raw) if raw else ""
        except YamlTooLarge as err:
            raise BenchError(f"--set {key.strip()}: {err}") from None
        except (yaml.YAMLError, RecursionError):
            value = raw
        pairs.append((key.strip(), value))
    return pairs


def read_yaml(path: Path) -> dict:
    """Parse a YAML mapping; syntax errors name the file, line and column."""
    if not path.is_file():
        raise BenchError(f"config file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise BenchError(f"config file {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
                         "save it as UTF-8") from None  # fmt: skip
    except OSError as err:
        raise BenchError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        data = safe_load_bounded(text)
    except YamlTooLarge as err:
        raise BenchError(f"{path}: refusing the YAML: {err}") from None
    except RecursionError:
        raise BenchError(f"{path}: the YAML is nested too deeply") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise BenchError(f"malformed YAML at {where}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise BenchError(f"malformed YAML in {path}: {err}") from None
    if not isinstance(data, dict):
        raise BenchError(f"{path}: the top level must be a mapping of settings, got {type(data).__name__}")
    return data


def non_finite_path(value: Any, where: str = "") -> str | None:
    """The dotted path of the first NaN or infinity in a parsed YAML tree, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "(top level)"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = non_finite_path(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def validate(raw: dict, source: str) -> GridConfig:
    """A validated grid, or one :class:`BenchError` line naming ``source``, the key and the value."""
    bad = non_finite_path(raw)
    if bad is not None:
        raise BenchError(f"{source}: {bad} must be a finite number, got {_lookup(raw, bad)}")
    try:
        return GridConfig.model_validate(raw)
    except ValidationError as err:
        raise BenchError(validation_error_line(err, GridConfig, raw, source, unknown="setting")) from None


def _lookup(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    return tree


def load_config(path: str | Path, overrides: list[str] | None = None) -> GridConfig:
    """Read, override (``--set``) and validate a grid file."""
    path = Path(path)
    raw = read_yaml(path)
    raw = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    if raw.get("name") is None:
        raw["name"] = default_name(path)
    return validate(raw, str(path))
