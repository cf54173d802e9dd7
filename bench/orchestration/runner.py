"""Execute grid cells: data -> poisoned training -> backdoored model -> defense -> metrics.

:class:`CellRunner` owns the expensive, shareable objects of a worker process (loaded datasets,
the most recently used backdoored model) and the artifact cache, so consecutive cells that share
a model train it at most once and load it at most once. Defenses reach the cache for their
shared sub-results through a :class:`StoreContext`. Every artifact a job touches is logged as
built or loaded (:meth:`CellRunner.take_events`): the job's entry under ``jobs/`` and the cell's
record carry the list.

Evaluating a cell of the grid's first seed also captures the penultimate features of its t-SNE
sample (:mod:`bench.core.tsne_sample`) from the evaluation's own forward passes; they travel back
with the record, and the driver saves both. The same cells pass a seeded handful of poisoned test
images to the defense's illustration hook (:meth:`defenses.base.Defense.illustrations`, e.g.
BTI-DBF's inverted and purified images) and send back what it returns
(:mod:`bench.core.illustrations`).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import bench
from attacks.base import Attack, FitContext
from bench.core.data import DataPaths, DataSplit, ImageSet, load_dataset, stratified_split
from bench.core.device import autocast, to_float
from bench.core.files import stable_hash
from bench.core.illustrations import CellIllustrations, choose_images
from bench.core.metrics import backdoor_metrics, evaluate_with_features, float_batches
from bench.core.models import build_model
from bench.core.registry import ATTACKS, DEFENSES
from bench.core.seeding import derive_seed, generator, seed_everything
from bench.core.tsne_sample import CellFeatures, sample_indices
from bench.nn.train import standard_augment, train_classifier
from bench.orchestration.config import GridConfig, PluginSpec, recipe_json
from bench.orchestration.grid import ARTIFACT_VERSION, Cell
from bench.orchestration.store import SHARED_PREFIX, ArtifactStore
from defenses.base import Defense, DefenseContext, MissingArtifactError, Scope, SharedArtifact


@dataclass
class CellData:
    """The data one cell works on, split once per (dataset, seed)."""

    attacker_train: ImageSet  # what the attacker poisons and the model is trained on
    defender_benign: ImageSet  # the held-out clean split the defender may use
    test: ImageSet


@dataclass
class CellResult:
    """What computing a cell gives the driver to write: the record, its t-SNE features and illustrations."""

    record: dict[str, Any]
    features: CellFeatures | None = None
    illustrations: CellIllustrations | None = None


def versions() -> dict[str, str]:
    import torchvision

    return {"bench": bench.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}  # fmt: skip


class StoreContext(DefenseContext):
    """The runner's :class:`DefenseContext`: shared sub-results in the artifact cache.

    The key of an artifact is its kind and key parts plus, by scope, the defender's benign data
    (the cell's split and the defense's ``benign_fraction``) and the backdoored model; creating
    one holds the artifact's lock from the miss to the save, so across workers and reruns each is
    built once. Every build and load is appended to ``events``.
    """

    def __init__(self, store: ArtifactStore, scopes: Mapping[str, Mapping[str, Any]], events: list[dict]) -> None:
        super().__init__()
        self.store = store
        self.scopes = scopes
        self.events = events

    def key(self, kind: str, key_parts: Mapping[str, Any], scope: Scope = "data") -> str:
        super().key(kind, key_parts, scope)  # validates kind and scope
        return stable_hash({"v": ARTIFACT_VERSION, "kind": kind, "scope": dict(self.scopes[scope]),
                            "parts": dict(key_parts)})  # fmt: skip

    def cached(
        self, kind: str, key_parts: Mapping[str, Any], build: Callable[[], Any], *, scope: Scope = "data"
    ) -> SharedArtifact:
        key = self.key(kind, key_parts, scope)
        value, _ = load_or_build(self.store, SHARED_PREFIX + kind, key, build, self.events)
        return SharedArtifact(kind, key, value)

    def load(self, kind: str, key: str) -> Any:
        self.check_kind(kind)
        with self.store.lock(SHARED_PREFIX + kind, key):
            value = self.store.load(SHARED_PREFIX + kind, key)
        if value is None:
            raise MissingArtifactError(f"no {kind} artifact {key} in {self.store.root}")
        self.events.append({"kind": SHARED_PREFIX + kind, "key": key, "action": "loaded"})
        return value


def load_or_build(
    store: ArtifactStore, kind: str, key: str, build: Callable[[], Any], events: list[dict]
) -> tuple[Any, bool]:
    """(the artifact, whether it was loaded): under its lock, load it or build and save it.

    A second worker that reaches a missing artifact waits on the lock, then loads what the first
    one built; the build/load is appended to ``events``.
    """
    with store.lock(kind, key):
        value = store.load(kind, key)
        if value is not None:
            events.append({"kind": kind, "key": key, "action": "loaded"})
            return value, True
        start = time.perf_counter()
        value = build()
        store.save(kind, key, value)
    events.append({"kind": kind, "key": key, "action": "built", "seconds": round(time.perf_counter() - start, 3)})
    return value, False


class CellRunner:
    """Runs cells one at a time in this process, reusing data and models between them."""

    def __init__(self, config: GridConfig, paths: DataPaths, artifacts: ArtifactStore, device: torch.device) -> None:
        self.config = config
        self.paths = paths
        self.artifacts = artifacts
        self.device = device
        self._datasets: dict[str, DataSplit] = {}
        self._model_memo: tuple[str, nn.Module] | None = None
        self._events: list[dict] = []

    def take_events(self) -> list[dict]:
        """The artifacts built or loaded since the last call (for the job log and the record)."""
        events, self._events = self._events, []
        return events

    # ----------------------------------------------------------------- data
    def dataset(self, spec: PluginSpec) -> DataSplit:
        key = spec.model_dump_json(exclude={"label"})
        if key not in self._datasets:
            self._datasets[key] = load_dataset(spec.name, self.paths, **spec.params)
        return self._datasets[key]

    def cell_data(self, cell: Cell) -> CellData:
        split = self.dataset(cell.dataset)
        n_holdout = round(self.config.holdout * len(split.train))
        benign_idx, attacker_idx = stratified_split(split.train.y, n_holdout, derive_seed(cell.seed, "holdout"))
        return CellData(split.train.subset(attacker_idx), split.train.subset(benign_idx), split.test)

    def fitted_attack(self, cell: Cell, data: CellData) -> Attack:
        attack: Attack = ATTACKS.create(cell.attack.name, cell.attack.params)
        ctx = FitContext(self.device, train_clean_model=lambda: self.clean_model(cell, data))
        attack.fit(data.attacker_train, generator(cell.seed, "attack-fit"), ctx)
        return attack

    # ----------------------------------------------------------------- models
    def _new_model(self, cell: Cell, data: CellData) -> nn.Module:
        seed_everything(derive_seed(cell.seed, "init"))
        train = data.attacker_train
        return build_model(cell.model.name, train.num_classes, train.x.shape[1], **cell.model.params)

    def _cached_or_trained(self, key: str, cell: Cell, data: CellData, train_fn) -> tuple[nn.Module, bool]:
        if self._model_memo and self._model_memo[0] == key:
            self._events.append({"kind": "models", "key": key, "action": "in memory"})
            return self._model_memo[1], True
        model = self._new_model(cell, data)

        trained: list[nn.Module] = []

        def train() -> dict[str, torch.Tensor]:
            trained.append(train_fn(model))
            return {k: v.cpu() for k, v in trained[0].state_dict().items()}

        # A second worker waits on the lock, then loads what the first trained.
        state, cached = load_or_build(self.artifacts, "models", key, train, self._events)
        if cached:
            model.load_state_dict(state)
        else:
            model = trained[0]
        if self.device.type == "cuda" and self.config.train.channels_last:
            # The layout training leaves a model in, whether it was trained or loaded: the numbers
            # of the fits and evaluations that use it do not depend on which.
            model.to(self.device, memory_format=torch.channels_last)
        model.to(self.device).eval()
        self._model_memo = (key, model)
        return model, cached

    def backdoored_model(self, cell: Cell, data: CellData, attack: Attack) -> tuple[nn.Module, bool]:
        def train(model: nn.Module) -> nn.Module:
            settings = self.config.poison
            poisoned = attack.poison_train(data.attacker_train, settings.rate, settings.target,
                                           generator(cell.seed, "poison"), pool=settings.pool)  # fmt: skip
            recipe = self.config.train_for(cell.model)  # the grid's train under the model entry's own
            augment = attack.batch_augment(data.attacker_train, poisoned, standard_augment(recipe))
            return train_classifier(
                model, poisoned.train.x, poisoned.train.y, recipe, self.device,
                derive_seed(cell.seed, "train"), batch_augment=augment,
                desc=f"train {cell.model.name} [{cell.attack_label}]",
            )  # fmt: skip

        return self._cached_or_trained(cell.model_key, cell, data, train)

    def clean_model(self, cell: Cell, data: CellData) -> nn.Module:
        """A model trained with the same recipe on the unpoisoned attacker split: the ``clean``
        reference row's model, cached under its key and so trained once for the whole grid."""
        key = cell.clean_model_key

        def train(model: nn.Module) -> nn.Module:
            return train_classifier(model, data.attacker_train.x, data.attacker_train.y,
                                    self.config.train_for(cell.model), self.device, derive_seed(cell.seed, "train"),
                                    desc=f"train clean {cell.model.name}")  # fmt: skip

        memo = self._model_memo
        model, _ = self._cached_or_trained(key, cell, data, train)
        self._model_memo = memo  # the clean model is a side trip; keep the backdoored one memoised
        return model

    # ----------------------------------------------------------------- defenses
    @staticmethod
    def _benign_count(data: CellData, defense: Defense) -> int | None:
        """``benign_fraction`` of the whole training set as a count; None: the whole holdout."""
        return defense.benign_count(len(data.attacker_train) + len(data.defender_benign), len(data.defender_benign))

    def benign_size(self, data: CellData, defense: Defense) -> int | None:
        """How many clean images the defense fits on (None: it fits nothing); recorded per cell."""
        if not defense.trainable:
            return None
        count = self._benign_count(data, defense)
        return len(data.defender_benign) if count is None else count

    def benign_subset(self, cell: Cell, data: CellData, defense: Defense) -> ImageSet:
        """The defender's clean data: ``benign_fraction`` of the training set, from the holdout."""
        count = self._benign_count(data, defense)
        if count is None:
            return data.defender_benign
        index, _ = stratified_split(data.defender_benign.y, count, derive_seed(cell.seed, "benign-subset"))
        return data.defender_benign.subset(index)

    def defense_context(self, cell: Cell, defense: Defense) -> StoreContext:
        """The context through which this cell's defense reaches shared artifacts (see its scopes)."""
        data = {"split": cell.data_key, "benign_fraction": defense.benign_fraction}
        scopes = {"global": {}, "data": data, "model": {**data, "model": cell.model_key}}
        return StoreContext(self.artifacts, scopes, self._events)

    def defense(self, cell: Cell, data: CellData, model: nn.Module) -> tuple[Defense, bool]:
        defense: Defense = DEFENSES.create(cell.defense.name, cell.defense.params)
        defense.bind(model, self.device, derive_seed(cell.seed, "defense"), self.defense_context(cell, defense))
        if not defense.trainable:
            return defense, True
        assert cell.defense_key is not None

        with self.artifacts.lock("defenses", cell.defense_key):
            state = self.artifacts.load("defenses", cell.defense_key)
            if state is not None:
                try:
                    defense.load_state(state)
                    self._events.append({"kind": "defenses", "key": cell.defense_key, "action": "loaded"})
                    return defense, True
                except MissingArtifactError:
                    pass  # a shared artifact the state refers to is gone: fit again (that rebuilds it)
            start = time.perf_counter()
            defense.fit(self.benign_subset(cell, data, defense), generator(cell.seed, "defense-fit"))
            self.artifacts.save("defenses", cell.defense_key, defense.state())
        self._events.append({"kind": "defenses", "key": cell.defense_key, "action": "built",
                             "seconds": round(time.perf_counter() - start, 3)})  # fmt: skip
        return defense, False

    # ----------------------------------------------------------------- one cell
    def captures_features(self, cell: Cell) -> bool:
        """t-SNE figures show the first seed: its cells capture their sample's features."""
        return self.config.tsne.per_class > 0 and cell.order[4] == 0

    def _undefended_features(self, model: nn.Module, images: Tensor) -> Tensor:
        batches = float_batches(images, self.device, self.config.eval_batch_size)
        with autocast(self.device, cuda_bf16=self.config.eval_amp):  # as the evaluation computes them
            out = [model.features(x).flatten(1).float() for _, x in batches]
        return torch.cat(out).cpu() if out else torch.empty(0, 0)

    def _evaluate(self, cell: Cell, data: CellData, model: nn.Module, defense: Defense, poisoned_x: Tensor,
                  poisoned_y: Tensor) -> tuple[dict[str, float], CellFeatures | None]:  # fmt: skip
        """BA/ASR/RA, and for a capturing cell the t-SNE features from the same forward passes."""
        target, batch = self.config.poison.target, self.config.eval_batch_size
        test = data.test
        # A model without a ``head`` layer (outside the model contract) is evaluated without the capture.
        if not self.captures_features(cell) or not isinstance(getattr(defense.model, "head", None), nn.Module):
            return backdoor_metrics(defense.predict, test.x, test.y, poisoned_x, poisoned_y, target, self.device,
                                    batch, self.config.eval_amp), None  # fmt: skip
        settings = self.config.tsne
        benign, poisoned = sample_indices(test.y, poisoned_y, settings.per_class, settings.poisoned_per_class, cell.seed)
        result = evaluate_with_features(defense.predict_with_features, test.x, test.y, poisoned_x, poisoned_y, target,
                                        self.device, batch, benign, poisoned, self.config.eval_amp)  # fmt: skip
        width = result.clean_features.shape[1]

        def rows(features: Tensor, n: int):  # an empty poisoned sample still has the feature width
            return features.reshape(n, width).numpy()

        features = CellFeatures(
            benign=rows(result.clean_features, len(benign)), poisoned=rows(result.poisoned_features, len(poisoned)),
            benign_labels=test.y[benign].numpy(), poisoned_labels=poisoned_y[poisoned].numpy(),
            classes=list(test.classes), target=target, per_class=settings.per_class,
            poisoned_per_class=settings.poisoned_per_class,
        )  # fmt: skip
        if cell.order[3] == 0 and not any(spec.name == "none" for spec in self.config.defenses):
            # No ``none`` cell will show the undefended model: the first defense's cell keeps its features.
            features.reference_benign = rows(self._undefended_features(model, test.x[benign]), len(benign))
            features.reference_poisoned = rows(self._undefended_features(model, poisoned_x[poisoned]), len(poisoned))
        return result.metrics, features

    def _illustrate(self, cell: Cell, data: CellData, defense: Defense, poisoned_x: Tensor,
                    poisoned_y: Tensor) -> CellIllustrations | None:  # fmt: skip
        """The defense's illustration rows for a seeded choice of poisoned test images (first seed only)."""
        count = self.config.illustrations.count
        if count == 0 or cell.order[4] != 0 or poisoned_y.numel() == 0:
            return None
        index = choose_images(count, int(poisoned_y.numel()), cell.seed)
        # poison_test keeps the order of the non-target test images: these are the originals.
        clean = data.test.x[data.test.y != self.config.poison.target][index]
        poisoned = poisoned_x[index]
        rows = defense.illustrations(to_float(clean).to(self.device), to_float(poisoned).to(self.device))
        if not rows:
            return None
        return CellIllustrations.from_tensors(clean, poisoned, poisoned_y[index], index, list(data.test.classes), rows)

    def run(self, cell: Cell) -> CellResult:
        """Compute one cell: its record (not yet written) and, for the first seed, its t-SNE features."""
        t0 = time.perf_counter()
        data = self.cell_data(cell)
        attack = self.fitted_attack(cell, data)
        t1 = time.perf_counter()
        model, model_cached = self.backdoored_model(cell, data, attack)
        t2 = time.perf_counter()
        defense, defense_cached = self.defense(cell, data, model)
        t3 = time.perf_counter()
        poisoned_x, poisoned_y = attack.poison_test(data.test, self.config.poison.target)
        with torch.no_grad():
            metrics, features = self._evaluate(cell, data, model, defense, poisoned_x, poisoned_y)
            illustrations = self._illustrate(cell, data, defense, poisoned_x, poisoned_y)
        t4 = time.perf_counter()
        record = {
            "cell_id": cell.cell_id,
            "dataset": cell.dataset.name,
            "dataset_label": cell.dataset.display(),
            "model": cell.model.name,
            "model_label": cell.model.display(),
            "train": recipe_json(self.config.train_for(cell.model)),  # the recipe this cell's model was trained with
            "attack": cell.attack.name,
            "attack_label": cell.attack_label,
            "attack_params": cell.attack_params,
            "defense": cell.defense.name,
            "defense_label": cell.defense_label,
            "defense_params": cell.defense_params,
            "intensity": cell.intensity,
            "seed": cell.seed,
            "order": list(cell.order),
            **metrics,
            "image_shape": list(data.test.x.shape[1:]),  # channels, height, width of the data
            "n_test_clean": len(data.test),
            "n_test_poisoned": int(poisoned_y.numel()),
            "n_attacker_train": len(data.attacker_train),
            "n_defender_benign": len(data.defender_benign),
            "n_defense_fit": self.benign_size(data, defense),  # benign images the defense was fitted on
            "defense_findings": defense.findings(),  # e.g. BTI-DBF's detected target class
            "model_key": cell.model_key,
            "defense_key": cell.defense_key,
            "model_cached": model_cached,
            "defense_cached": defense_cached,
            "artifacts": self.take_events(),
            "seconds": {"data": t1 - t0, "model": t2 - t1, "defense": t3 - t2, "eval": t4 - t3, "total": t4 - t0},
            "device": str(self.device),
            # How the job computed, beside the library versions: what else decides the bits.
            "threads_per_job": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "versions": versions(),
            "config": self.config.resolved(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return CellResult(record, features, illustrations)

