"""The attack contract, checked for every registered attack (a new attack is checked automatically).

Each attack is built with its default parameters and fitted on a small class-balanced sample of
real data (MNIST: 1 channel, 28 px; CIFAR-10: 3 channels, 32 px). A clean-label attack gets a
small untrained CNN as its "clean model": the checks here are about the contract, not about
how strong the backdoor is.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import small_split

from attacks.base import Attack, FitContext, PoisonedSet
from bench.core.data import DataSplit, ImageSet
from bench.core.device import to_float, to_uint8
from bench.core.models import build_model
from bench.core.registry import ATTACKS
from bench.nn.augment import random_flip

NAMES = ATTACKS.names()
RATE = 0.05
TARGET = 0
N_TRAIN = 240
N_TEST = 60
# Cheaper settings for attacks whose defaults are slow; the contract does not depend on them.
FAST_PARAMS = {"label_consistent": {"steps": 5}}


@pytest.fixture(scope="module", params=["mnist", "cifar10"])
def data(request: pytest.FixtureRequest) -> DataSplit:
    return small_split(request, N_TRAIN, N_TEST)


def tiny_model_factory(train: ImageSet):
    def build():
        torch.manual_seed(0)
        return build_model("small_cnn", train.num_classes, train.x.shape[1], width=4).eval()

    return build


def fitted(name: str, train: ImageSet, seed: int = 0) -> Attack:
    attack: Attack = ATTACKS.get(name)(**FAST_PARAMS.get(name, {}))
    ctx = FitContext(torch.device("cpu"), train_clean_model=tiny_model_factory(train))
    attack.fit(train, torch.Generator().manual_seed(seed), ctx)
    return attack


def poisoned(attack: Attack, train: ImageSet, seed: int = 1) -> PoisonedSet:
    return attack.poison_train(train, RATE, TARGET, torch.Generator().manual_seed(seed))


def is_inert(attack: Attack) -> bool:
    """The ``clean`` reference poisons nothing and has an identity trigger."""
    return attack.poisoning_rate(RATE) == 0


@pytest.mark.parametrize("name", NAMES)
def test_trigger_keeps_shape_dtype_and_range(name: str, data: DataSplit) -> None:
    attack = fitted(name, data.train)
    x8 = data.test.x[:16]
    xf = to_float(x8)
    out8, outf = attack.apply(x8), attack.apply(xf)
    assert out8.shape == x8.shape and out8.dtype == torch.uint8
    assert outf.shape == xf.shape and outf.dtype == xf.dtype
    assert float(outf.min()) >= 0.0 and float(outf.max()) <= 1.0
    # The uint8 path is the float path, quantised.
    assert torch.equal(out8, to_uint8(attack.apply(xf)))
    changed = (outf != xf).flatten(1).any(1)
    if is_inert(attack):
        assert not changed.any()
    else:
        assert changed.all(), f"{name}: the trigger left {int((~changed).sum())} of 16 images unchanged"


@pytest.mark.parametrize("name", NAMES)
def test_batch_path_equals_one_image_path(name: str, data: DataSplit) -> None:
    attack = fitted(name, data.train)
    x8 = data.test.x[:6]
    batch8, batchf = attack.apply(x8), attack.apply(to_float(x8))
    for i in range(x8.shape[0]):
        assert torch.equal(attack.apply(x8[i : i + 1]), batch8[i : i + 1])
        torch.testing.assert_close(attack.apply(to_float(x8[i : i + 1])), batchf[i : i + 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_per_seed(name: str, data: DataSplit) -> None:
    a, b = fitted(name, data.train, seed=3), fitted(name, data.train, seed=3)
    assert a.describe() == b.describe()
    assert torch.equal(a.apply(data.test.x), b.apply(data.test.x))
    pa, pb = poisoned(a, data.train, seed=5), poisoned(b, data.train, seed=5)
    assert torch.equal(pa.train.x, pb.train.x) and torch.equal(pa.train.y, pb.train.y)
    assert torch.equal(pa.poisoned_index, pb.poisoned_index) and torch.equal(pa.cover_index, pb.cover_index)
    if pa.poisoned_index.numel() > 1:
        other = poisoned(fitted(name, data.train, seed=3), data.train, seed=6)
        assert not torch.equal(other.poisoned_index, pa.poisoned_index), "the poisoned samples ignore the seed"


@pytest.mark.parametrize("name", NAMES)
def test_poisoned_count_and_labels_follow_the_attack_rule(name: str, data: DataSplit) -> None:
    train = data.train
    attack = fitted(name, train)
    result = poisoned(attack, train)
    index, cover = result.poisoned_index, result.cover_index
    rate = attack.poisoning_rate(RATE)
    own = getattr(attack.params, "poison_rate", None)
    if type(attack).poisoning_rate is Attack.poisoning_rate:
        # The grid's rate, unless the attack has its own ``poison_rate`` parameter set.
        assert rate == (RATE if own is None else own)
    # Clean-label attacks poison a share of the target class, all-to-one attacks a share of the set.
    counted = int((train.y == TARGET).sum()) if attack.clean_label else len(train)
    assert index.numel() == round(rate * counted)
    assert index.dtype == cover.dtype == torch.int64
    assert index.unique().numel() == index.numel() and cover.unique().numel() == cover.numel()
    assert not set(index.tolist()) & set(cover.tolist()), "a sample is both poisoned and cover"
    if attack.clean_label:
        assert bool((train.y[index] == TARGET).all()), "clean-label attacks poison target-class samples only"
        assert torch.equal(result.train.y, train.y), "clean-label attacks keep every label"
    else:
        assert bool((train.y[index] != TARGET).all()), "all-to-one attacks poison non-target samples only"
        assert bool((result.train.y[index] == TARGET).all())
    touched = torch.zeros(len(train), dtype=torch.bool)
    touched[index] = True
    touched[cover] = True
    assert torch.equal(result.train.y[~touched], train.y[~touched]) and torch.equal(result.train.y[cover], train.y[cover])
    assert torch.equal(result.train.x[~touched], train.x[~touched]), "samples outside poisoned/cover were modified"
    if index.numel():
        assert bool((result.train.x[index] != train.x[index]).flatten(1).any(1).all()), "a poisoned sample is unchanged"
    assert result.train.x.dtype == torch.uint8 and result.train.x.shape == train.x.shape


@pytest.mark.parametrize("name", NAMES)
def test_asr_set_has_no_target_class_sample(name: str, data: DataSplit) -> None:
    attack = fitted(name, data.train)
    x, y = attack.poison_test(data.test, TARGET)
    keep = data.test.y != TARGET
    assert not bool((y == TARGET).any())
    assert y.numel() == int(keep.sum()) and x.shape[0] == y.numel()
    assert torch.equal(y, data.test.y[keep])
    assert torch.equal(x, attack.apply(data.test.x[keep]))


@pytest.mark.parametrize("name", NAMES)
def test_train_augment_keeps_shape_range_and_is_seeded(name: str, data: DataSplit) -> None:
    attack = fitted(name, data.train)
    x = to_float(data.train.x[:8])
    a = attack.train_augment(x, torch.Generator().manual_seed(0))
    b = attack.train_augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_batch_augment_keeps_shape_range_and_is_seeded(name: str, data: DataSplit) -> None:
    """The per-batch training transformation of the poisoned set, with a flip as the standard augmentation."""
    attack = fitted(name, data.train)
    result = poisoned(attack, data.train)
    augment = attack.batch_augment(data.train, result, lambda x, gen: random_flip(x, gen))
    index = torch.arange(0, len(data.train), 7)
    x = to_float(result.train.x[index])
    a = augment(x, index, torch.Generator().manual_seed(0))
    b = augment(x, index, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_describe_is_small_and_json_serialisable(name: str, data: DataSplit) -> None:
    """describe() feeds the cache key: fitted state (tensors) must stay out of it."""
    attack = fitted(name, data.train)
    text = json.dumps(attack.describe(), sort_keys=True)
    assert len(text) < 2000
    assert describe_before_fit(name) == attack.describe(), "fit() changed the public parameters"


def describe_before_fit(name: str) -> dict:
    return ATTACKS.get(name)(**FAST_PARAMS.get(name, {})).describe()
