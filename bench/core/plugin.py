"""The base of every registered plugin: a name, a code version, typed parameters, a data check.

Attacks, defenses, models and datasets all derive from :class:`Plugin`, so the four registries
share one mechanism (:meth:`bench.core.registry.Registry.create`):

- ``Params`` (a :class:`~bench.core.params.PluginParams` model) declares the parameters; the
  constructor validates them and the plugin reads ``self.params``;
- ``version`` is bumped whenever a change to the plugin's code changes what it produces: the
  plugin's :meth:`identity` (name, version, validated parameters) is its part of every cache
  key, so such a change invalidates exactly the artifacts it touches;
- :meth:`check` receives the metadata of each dataset of a grid (class count, image size,
  channels) before any work starts, for what can only be checked against the data -- a patch
  that does not fit the image, a pad as large as the image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

from pydantic import ValidationError

from bench.core.errors import BenchError
from bench.core.params import PluginParams, validation_error_line


@dataclass(frozen=True)
class DatasetMeta:
    """What a grid can know about a dataset without decoding it (see ``Dataset.metadata``)."""

    name: str
    num_classes: int
    channels: int
    height: int
    width: int
    train_size: int | None = None  # None: unknown until the data is loaded
    test_size: int | None = None

    def shape(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}"


class Plugin:
    """Name, code version and typed parameters of a registered plugin."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    Params: ClassVar[type[PluginParams]] = PluginParams
    params: PluginParams

    def __init__(self, params: PluginParams | Mapping[str, Any] | None = None, **raw: Any) -> None:
        self.params = self.parse_params(params, **raw)

    @classmethod
    def parse_params(cls, params: PluginParams | Mapping[str, Any] | None = None, **raw: Any) -> PluginParams:
        """Validate parameters (a mapping, keywords, or an already validated ``Params``).

        A bad value raises one :class:`BenchError` line naming the plugin, the parameter, what
        is allowed and the value given.
        """
        if type(params) is cls.Params and not raw:
            return params
        given = params.model_dump() if isinstance(params, PluginParams) else dict(params or {})
        given.update(raw)
        try:
            return cls.Params.model_validate(given)
        except ValidationError as err:
            raise BenchError(validation_error_line(err, cls.Params, given, cls.name or cls.__name__)) from None

    @classmethod
    def identity_of(cls, params: PluginParams, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """Name, code version and JSON parameters: the plugin's part of a cache key."""
        return {"name": cls.name, "version": cls.version,
                "params": params.model_dump(mode="json", exclude=set(exclude))}  # fmt: skip

    def identity(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        return self.identity_of(self.params, exclude)

    def describe(self) -> dict[str, Any]:
        """The validated parameters as JSON values (what a record shows)."""
        return self.params.model_dump(mode="json")

    def check(self, meta: DatasetMeta) -> None:
        """Raise :class:`BenchError` (see :meth:`fail`) when these parameters cannot work on a
        dataset with this metadata; called for every dataset of a grid before any work."""

    def fail(self, message: str) -> NoReturn:
        """Raise the plugin's one-line error: ``<name>: <message>``."""
        raise BenchError(f"{self.name}: {message}")
