"""Grid configuration: YAML in, a validated :class:`GridConfig` out.

A grid file lists datasets, models, attacks, defenses and seeds; the grid is their product. A
plugin entry is either a bare name (``badnets``) or a mapping with ``name`` and parameters
(``{name: shrinkpad, pad: [2, 4, 8]}``); a list given for a defense's intensity parameter
expands into one grid column per value. Validation (pydantic) happens before any work starts,
and every problem is reported as one line naming the file and the offending key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bench.core.determinism import Deterministic
from bench.core.errors import BenchError
from bench.nn.train import TrainRecipe


class PluginSpec(BaseModel):
    """A registered name plus its parameters, and an optional display label."""

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
            rest = {k: v for k, v in value.items() if k not in ("name", "label")}
            return {"name": value.get("name"), "label": value.get("label"), "params": rest}
        return value

    def display(self) -> str:
        if self.label:
            return self.label
        if not self.params:
            return self.name
        return f"{self.name}(" + ", ".join(f"{k}={v}" for k, v in sorted(self.params.items())) + ")"


class PoisonSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: float = 0.1
    target: int = 0

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"poisoning rate must be in (0, 1), got {v}")
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"target label must be >= 0, got {v}")
        return v


class GridConfig(BaseModel):
    """A whole grid: the lists whose product is the set of cells, plus shared settings."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    datasets: list[PluginSpec] = Field(min_length=1)
    models: list[PluginSpec] = Field(min_length=1)
    attacks: list[PluginSpec] = Field(min_length=1)
    defenses: list[PluginSpec] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    poison: PoisonSettings = Field(default_factory=PoisonSettings)
    train: TrainRecipe = Field(default_factory=TrainRecipe)
    # Fraction of the training set held out as the defender's clean data; the attacker never
    # sees (or poisons) it and the backdoored model is not trained on it.
    holdout: float = 0.2
    eval_batch_size: int = 1024
    device: str = "auto"
    # Intra-op threads of every job, whatever the machine: a job's numbers depend on it (float
    # reductions split over threads), so it is part of the experiment, not of the machine.
    threads_per_job: int = 1
    # torch's deterministic algorithms (and cuDNN without autotuning) for every job; "warn" keeps
    # running ops that have no deterministic CUDA kernel and warns. No effect on CPU numbers.
    deterministic: Deterministic = False

    @field_validator("holdout")
    @classmethod
    def _holdout(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"holdout must be in [0, 1), got {v}")
        return v

    @field_validator("eval_batch_size", "threads_per_job")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @field_validator("deterministic", mode="before")
    @classmethod
    def _deterministic(cls, v: Any) -> Any:
        if isinstance(v, bool) or v == "warn":
            return v
        raise ValueError(f"must be true, false or warn, got {v!r}")

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------- loading


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
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key.strip(), value))
    return pairs


def read_yaml(path: Path) -> dict:
    """Parse a YAML mapping; syntax errors name the file, line and column."""
    if not path.is_file():
        raise BenchError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise BenchError(f"malformed YAML at {where}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise BenchError(f"malformed YAML in {path}: {err}") from None
    if not isinstance(data, dict):
        raise BenchError(f"{path}: the top level must be a mapping of settings, got {type(data).__name__}")
    return data


def validate(raw: dict, source: str) -> GridConfig:
    try:
        return GridConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = first["msg"].removeprefix("Value error, ")
        more = f" (and {err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
        raise BenchError(f"{source}: {where}: {msg}{more}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> GridConfig:
    """Read, override (``--set``) and validate a grid file."""
    path = Path(path)
    raw = read_yaml(path)
    raw = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    raw.setdefault("name", path.stem)
    return validate(raw, str(path))
