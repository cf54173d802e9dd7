"""The defense contract: a defended classifier built around a frozen (possibly backdoored) model.

Lifecycle, driven by the grid runner:

1. ``defense = cls(**params)`` -- parameters from the config, validated in ``__init__``.
2. ``defense.bind(model, device, seed)`` -- attach the frozen model.
3. Trainable defenses (``trainable = True``) then either ``load_state(cached)`` or
   ``fit(benign, gen)`` followed by ``state()`` for the cache.
4. ``defense.predict(x)`` -- logits of the defended classifier for float images in [0, 1].

Input-transformation defenses override :meth:`transform` only: ``predict`` and ``features``
(penultimate features for t-SNE) both see the transformed images. Evaluation calls
:meth:`predict_with_features`, which runs ``predict`` and keeps the penultimate features of the
final forward pass, so the t-SNE sample costs nothing extra and no random draw changes. ``benign_fraction`` is the
share of the *whole* training set the defense trains on; the runner draws it from the held-out
clean split (``holdout`` in the grid config), so it cannot exceed the holdout.

``intensity_param`` names the parameter that trade-off curves sweep (ShrinkPad's ``pad``). When
``intensity_affects_fit`` is False the fitted state is shared across intensities, so sweeping
the knob never retrains anything.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bench.core.data import ImageSet
from bench.core.errors import BenchError


class Defense:
    """Base class of all defenses; the default ``predict`` is the undefended model."""

    name: ClassVar[str] = ""
    intensity_param: ClassVar[str | None] = None
    trainable: ClassVar[bool] = False
    intensity_affects_fit: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        if params:
            raise BenchError(f"defense {self.name!r}: unknown parameters {sorted(params)}")
        self.model: nn.Module | None = None
        self.device = torch.device("cpu")
        self.seed = 0
        # Share of the whole training set used as the defender's clean data; None = all held out.
        self.benign_fraction: float | None = None

    def bind(self, model: nn.Module, device: torch.device, seed: int = 0) -> None:
        """Attach the frozen model; its parameters are never updated by a test-time defense."""
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = device
        self.seed = seed

    @property
    def intensity(self) -> Any:
        return getattr(self, self.intensity_param) if self.intensity_param else None

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

    def transform(self, x: Tensor) -> Tensor:
        """The defense's input transformation (identity unless overridden)."""
        return x

    def predict(self, x: Tensor) -> Tensor:
        """Logits of the defended classifier on float images in [0, 1]."""
        assert self.model is not None, "bind() the defense to a model first"
        return self.model(self.transform(x))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features the frozen model computes on the transformed input."""
        assert self.model is not None, "bind() the defense to a model first"
        return self.model.features(self.transform(x))

    def predict_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``predict(x)`` and the penultimate features its logits came from, from one pass.

        The features are the input of the model's ``head`` in its last call during ``predict``
        (every model computes ``head(features(x))``; a defense that queries the model while
        transforming, as BDMAE does, makes its final call last). Going through ``predict`` itself
        keeps whatever a subclass does there (REFINE's output mapping) and draws exactly the
        random numbers ``predict`` draws, so BA and ASR are the same with or without the capture.
        """
        assert self.model is not None, "bind() the defense to a model first"
        head = getattr(self.model, "head", None)
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

    def describe(self) -> dict[str, Any]:
        """Parameters that determine the defense's effect (part of cache keys and records)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("model", "device", "seed")}
