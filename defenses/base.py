"""The defense contract: a defended classifier built around a frozen (possibly backdoored) model.

Lifecycle, driven by the grid runner:

1. ``defense = DEFENSES.create(name, params)`` -- parameters validated by the defense's
   ``Params`` model (see :mod:`bench.core.plugin`); :meth:`check` runs against each dataset's
   metadata when the grid is compiled.
2. ``defense.bind(model, device, seed, ctx)`` -- attach the frozen model, (re)start the
   defense's random streams from ``seed`` (fitted state survives a re-bind), and receive the
   :class:`DefenseContext` through which the defense asks for shared, cached sub-results.
3. Trainable defenses (``trainable = True``) then either ``load_state(cached)`` or
   ``fit(benign, gen)`` followed by ``state()`` for the cache.
4. ``defense.predict(x)`` -- logits of the defended classifier for float images in [0, 1].

Input-transformation defenses override :meth:`transform` only: ``predict`` and ``features``
(penultimate features for t-SNE) both see the transformed images. Evaluation calls
:meth:`predict_with_features`, which runs ``predict`` and keeps the penultimate features of the
final forward pass, so the t-SNE sample costs nothing extra and no random draw changes. A defense
that replaces the classifier (BTI-DBF's unlearning) overrides :attr:`classifier`; the frozen
model it was bound to is never modified. ``benign_fraction`` (a parameter of the defenses that
train) is the share of the *whole* training set the defense trains on; the runner draws it from
the held-out clean split (``holdout`` in the grid config), so it cannot exceed the holdout.

:meth:`illustrations` is an optional hook for figures: a defense that produces images worth
showing (BTI-DBF's inverted backdoor and purified inputs) returns them by name; evaluation saves
them for a few seeded poisoned test images (:mod:`bench.core.illustrations`). The default shows
nothing.

``intensity_param`` names the parameter that trade-off curves sweep (ShrinkPad's ``pad``). When
``intensity_affects_fit`` is False the fitted state is shared across intensities, so sweeping
the knob never retrains anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from bench.core.data import ImageSet
from bench.core.errors import BenchError
from bench.core.files import stable_hash
from bench.core.params import PluginParams
from bench.core.plugin import Plugin

Scope = Literal["global", "data", "model"]
SCOPES: tuple[Scope, ...] = ("global", "data", "model")
_RESERVED_KINDS = {"models", "defenses", "data", "locks"}


class MissingArtifactError(LookupError):
    """A defense state refers to a shared artifact that is no longer available (the caller refits)."""


@dataclass(frozen=True)
class SharedArtifact:
    """A shared sub-result: its kind, its content key (what a defense state refers to) and value."""

    kind: str
    key: str
    value: Any


class DefenseContext:
    """How a defense asks for shared sub-results: :meth:`cached` and :meth:`load`.

    Some parts of a fit do not depend on everything the fit depends on: BDMAE's autoencoder
    depends on the benign images but not on the backdoored model, BTI-DBF's pre-trained
    generator on both but not on the defense mode. Asking for them through the context lets the
    grid runner build each once and share it between defenses, workers and reruns (its
    implementation keeps them in the artifact cache, keyed by ``kind``, ``key_parts`` and the
    ``scope``: ``global`` -- the key parts alone; ``data`` -- also the benign data and the seed
    of the cell; ``model`` -- also the backdoored model).

    This base implementation, used outside a grid (tests, notebooks), builds on every call and
    remembers what it built, so :meth:`load` finds it again within the same context.
    """

    def __init__(self) -> None:
        self._memory: dict[tuple[str, str], Any] = {}

    @staticmethod
    def check_kind(kind: str) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", kind) or kind in _RESERVED_KINDS:
            raise ValueError(f"artifact kind {kind!r} must be lower-case letters, digits, '-' or '_', "
                             f"and not one of {sorted(_RESERVED_KINDS)}")  # fmt: skip

    def key(self, kind: str, key_parts: Mapping[str, Any], scope: Scope = "data") -> str:
        """The content key of a shared artifact (plain-JSON ``key_parts`` only)."""
        self.check_kind(kind)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        return stable_hash({"kind": kind, "scope": scope, "parts": dict(key_parts)})

    def cached(
        self, kind: str, key_parts: Mapping[str, Any], build: Callable[[], Any], *, scope: Scope = "data"
    ) -> SharedArtifact:
        """The artifact for these key parts: loaded when it exists, else ``build()`` (whose value
        must be torch-serialisable: tensors, state dicts, plain values) and saved."""
        key = self.key(kind, key_parts, scope)
        value = build()
        self._memory[(kind, key)] = value
        return SharedArtifact(kind, key, value)

    def load(self, kind: str, key: str) -> Any:
        """The value of an artifact :meth:`cached` produced; :class:`MissingArtifactError` if gone."""
        try:
            return self._memory[(kind, key)]
        except KeyError:
            raise MissingArtifactError(f"no {kind} artifact {key}") from None


class Defense(Plugin):
    """Base class of all defenses; the default ``predict`` is the undefended model."""

    intensity_param: ClassVar[str | None] = None
    trainable: ClassVar[bool] = False
    intensity_affects_fit: ClassVar[bool] = True

    def __init__(self, params: PluginParams | Mapping[str, Any] | None = None, **raw: Any) -> None:
        super().__init__(params, **raw)
        self.model: nn.Module | None = None
        self.device = torch.device("cpu")
        self.seed = 0
        self.ctx = DefenseContext()

    def bind(self, model: nn.Module, device: torch.device, seed: int = 0, ctx: DefenseContext | None = None) -> None:
        """Attach the frozen model (its parameters are never updated by a defense) and restart
        the defense's random streams from ``seed``; a fitted state survives a re-bind."""
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = device
        self.seed = seed
        if ctx is not None:
            self.ctx = ctx

    @property
    def benign_fraction(self) -> float | None:
        """Share of the whole training set used as the defender's clean data; None = all held out."""
        return getattr(self.params, "benign_fraction", None)

    def benign_count(self, total: int, available: int) -> int | None:
        """How many clean images the defense trains on, out of ``total`` training images of which
        ``available`` are held out; None = all of them. Impossible fractions are a user error."""
        fraction = self.benign_fraction
        if fraction is None:
            return None
        count = round(fraction * total)
        if not 0 < count <= available:
            self.fail(f"benign_fraction {fraction} needs {count} clean samples but the holdout has {available}; "
                      "raise 'holdout' in the config")  # fmt: skip
        return count

    @property
    def intensity(self) -> Any:
        return getattr(self.params, self.intensity_param) if self.intensity_param else None

    @property
    def classifier(self) -> nn.Module:
        """The classifier behind the input transformation: the frozen model unless the defense
        replaced it with a fitted copy."""
        assert self.model is not None, "bind() the defense to a model first"
        return self.model

    def fit(self, benign: ImageSet, gen: torch.Generator) -> None:
        """Train the defense on the defender's clean data (trainable defenses only)."""

    def fit_epochs(self) -> int | None:
        """Epochs over the benign data that :meth:`fit` makes, for ``run --dry-run``'s work estimate.

        0 for defenses that fit nothing; None when a trainable defense cannot say.
        """
        return None if self.trainable else 0

    def state(self) -> dict[str, Any]:
        """Everything ``fit`` produced, as tensors and plain values, for the artifact cache."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""

    def findings(self) -> dict[str, Any]:
        """What the fit concluded that a reader needs to judge the cell's numbers, as plain JSON
        values written into the cell's record (``defense_findings``): a trigger-inversion defense's
        detected target class tells a missed target from a weak removal. Default: nothing."""
        return {}

    def transform(self, x: Tensor) -> Tensor:
        """The defense's input transformation (identity unless overridden)."""
        return x

    def predict(self, x: Tensor) -> Tensor:
        """Logits of the defended classifier on float images in [0, 1]."""
        return self.classifier(self.transform(x))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features the classifier computes on the transformed input."""
        return self.classifier.features(self.transform(x))

    def illustrations(self, clean: Tensor, poisoned: Tensor) -> dict[str, Tensor]:
        """Named rows of images (each shaped like ``poisoned``, floats in [0, 1]) that show what the
        defense does to these poisoned test images (``clean``: their originals), for the report.

        Called after the cell's metrics are computed, so whatever random numbers a defense draws
        here must come from its own stream and never shift its predictions. Default: none.
        """
        return {}

    def predict_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``predict(x)`` and the penultimate features its logits came from, from one pass.

        The features are the input of the model's ``head`` in its last call during ``predict``
        (every model computes ``head(features(x))``; a defense that queries the model while
        transforming, as BDMAE does, makes its final call last). Going through ``predict`` itself
        keeps whatever a subclass does there (REFINE's output mapping) and draws exactly the
        random numbers ``predict`` draws, so BA and ASR are the same with or without the capture.
        """
        head = getattr(self.classifier, "head", None)
        if not isinstance(head, nn.Module):
            raise BenchError(f"defense {self.name!r}: the model has no 'head' layer to take penultimate features from")
        last: list[Tensor] = []

        def keep_input(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            last[:] = [inputs[0]]

        handle = head.register_forward_hook(keep_input)
        try:
            logits = self.predict(x)
        finally:
            handle.remove()
        if not last or last[0].shape[0] != logits.shape[0]:
            raise BenchError(f"defense {self.name!r}: predict() did not end with one model call on the batch")
        return logits, last[0]
