"""WaNet: the warping field is drawn from the seed, smooth, scaled by s, and reused at test time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attacks.wanet import WaNet
from bench.core.data import ImageSet, stratified_split
from bench.core.device import to_float
from bench.core.errors import BenchError
from bench.core.registry import ATTACKS
from bench.orchestration.config import load_config
from bench.orchestration.grid import compile_grid

REPO = Path(__file__).resolve().parent.parent


def fitted(seed: int = 0, **params) -> WaNet:
    attack = WaNet(**params)
    attack.fit(ImageSet(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64), ["a"]),
               torch.Generator().manual_seed(seed))  # fmt: skip
    return attack


def identity_grid(h: int, w: int) -> torch.Tensor:
    theta = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    return F.affine_grid(theta, [1, 1, h, w], align_corners=True)


def test_control_grid_is_k_by_k_and_normalised() -> None:
    attack = fitted(k=4)
    control = attack._control
    assert control is not None and control.shape == (1, 2, 4, 4)
    assert float(control.abs().mean()) == pytest.approx(1.0, abs=1e-6)
    assert float(control.min()) < 0 < float(control.max())


def test_offsets_are_s_times_the_upsampled_field_over_the_size() -> None:
    """At the four image corners, bicubic upsampling (align_corners) returns the control values exactly."""
    for s in (0.5, 1.0):
        attack = fitted(k=4, s=s)
        offset = attack.warp_grid(32, 32, torch.device("cpu")) - identity_grid(32, 32)
        control = attack._control[0]  # (2, k, k): x and y offsets
        for r, c in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            expected = s * control[:, r, c] / 32
            inside = ((identity_grid(32, 32)[0, r, c] + expected).abs() <= 1).all()
            if inside:
                torch.testing.assert_close(offset[0, r, c], expected, atol=1e-6, rtol=0)
    small = fitted(k=4, s=0.5).warp_grid(32, 32, torch.device("cpu")) - identity_grid(32, 32)
    large = fitted(k=4, s=1.0).warp_grid(32, 32, torch.device("cpu")) - identity_grid(32, 32)
    interior = (slice(None), slice(4, 28), slice(4, 28))
    torch.testing.assert_close(large[interior], 2 * small[interior], atol=1e-6, rtol=0)


def test_field_is_smooth_and_small(cifar10) -> None:
    """s = 0.5 moves pixels by a fraction of a pixel: the warped image stays close to the original."""
    attack = fitted(k=4, s=0.5)
    offset = attack.warp_grid(32, 32, torch.device("cpu")) - identity_grid(32, 32)
    pixels = offset.abs() * 31 / 2  # normalised units -> pixels
    assert float(pixels.max()) < 1.5
    # k = 4: neighbouring offsets differ little (a smooth field); k = 32 (the REFINE code's
    # setting, k = image size) gives per-pixel noise. Borders are left out: the grid is clamped there.
    for k, rough in ((4, False), (32, True)):
        inner = (fitted(k=k).warp_grid(32, 32, torch.device("cpu")) - identity_grid(32, 32))[:, 2:-2, 2:-2]
        jump = float((inner[:, 1:] - inner[:, :-1]).abs().max()) / float(inner.abs().max())
        assert (jump > 1.0) if rough else (jump < 0.35)
    x = to_float(cifar10.test.x[:32])
    out = attack.apply(x)
    assert 0 < float((out - x).abs().mean()) < 0.05


def test_zero_strength_is_the_identity(mnist) -> None:
    x = mnist.test.x[:8]
    assert torch.equal(fitted(s=0.0).apply(x), x)


def test_field_depends_on_the_seed_only(cifar10) -> None:
    x = cifar10.test.x[:4]
    assert torch.equal(fitted(seed=1).apply(x), fitted(seed=1).apply(x))
    assert not torch.equal(fitted(seed=1).apply(x), fitted(seed=2).apply(x))


def test_trigger_needs_fit() -> None:
    with pytest.raises(BenchError, match="fit"):
        WaNet().apply(torch.zeros(1, 3, 8, 8))


def test_noise_mode_adds_cover_samples_with_true_labels(cifar10) -> None:
    train = cifar10.train.subset(stratified_split(cifar10.train.y, 400, 0)[0])
    attack = fitted(k=4, s=0.5, cross_ratio=2.0)
    result = attack.poison_train(train, 0.1, 0, torch.Generator().manual_seed(0))
    n_poison = result.poisoned_index.numel()
    assert n_poison == 40 and result.cover_index.numel() == 2 * n_poison
    cover = result.cover_index
    assert torch.equal(result.train.y[cover], train.y[cover])
    # Cover samples are warped near the trigger's field but not exactly by it.
    exact = attack.apply(train.x[cover])
    noisy = result.train.x[cover]
    assert not torch.equal(noisy, exact)
    assert not torch.equal(noisy, train.x[cover])
    assert float((to_float(noisy) - to_float(exact)).abs().mean()) < 0.1
    assert torch.equal(result.train.x[result.poisoned_index], attack.apply(train.x[result.poisoned_index]))


def test_noise_mode_redraws_the_noise_every_epoch(cifar10) -> None:
    """Two passes over the same batch (two epochs) warp the cover samples with different noise, each
    time from the clean original; poisoned and clean rows are what ``poison_train`` stored."""
    train = cifar10.train.subset(stratified_split(cifar10.train.y, 200, 0)[0])
    attack = fitted(k=4, s=0.5, cross_ratio=2.0)
    result = attack.poison_train(train, 0.1, 0, torch.Generator().manual_seed(0))
    augment = attack.batch_augment(train, result, lambda x, gen: x)  # no standard augmentation
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))
    stored = to_float(result.train.x[index])
    gen = torch.Generator().manual_seed(2)
    first, second = augment(stored, index, gen), augment(stored, index, gen)
    cover = torch.isin(index, result.cover_index)
    assert int(cover.sum()) == 40
    assert torch.equal(first[~cover], stored[~cover]) and torch.equal(second[~cover], stored[~cover])
    differs = (first[cover] != second[cover]).flatten(1).any(1)
    assert bool(differs.all()), "a cover sample got the same noise in two epochs"
    exact = to_float(attack.apply(train.x[index[cover]]))
    for epoch in (first, second):  # each draw is the field plus noise: close to, not at, the trigger
        gap = (epoch[cover] - exact).abs().mean((1, 2, 3))
        assert float(gap.max()) < 0.1 and float(gap.min()) > 0
        assert torch.equal(epoch[cover], (epoch[cover] * 255).round() / 255)  # uint8 levels, as stored


def test_noise_mode_off_leaves_batches_to_the_standard_augmentation(cifar10) -> None:
    train = cifar10.train.subset(stratified_split(cifar10.train.y, 100, 0)[0])
    attack = fitted(k=4)
    result = attack.poison_train(train, 0.1, 0, torch.Generator().manual_seed(0))
    augment = attack.batch_augment(train, result, lambda x, gen: x.flip(3))
    x = to_float(result.train.x[:16])
    assert torch.equal(augment(x, torch.arange(16), torch.Generator()), x.flip(3))


def test_paper_grid_uses_the_reference_k_of_32() -> None:
    """The paper grid's WaNet is the REFINE code's: a 32 x 32 control grid on CIFAR-10 (default 4)."""
    cells = compile_grid(load_config(REPO / "configs" / "cifar10_paper.yaml"))
    wanet = {cell.attack_params["k"] for cell in cells if cell.attack.name == "wanet"}
    assert wanet == {32}
    attack = ATTACKS.create("wanet", next(c.attack.params for c in cells if c.attack.name == "wanet"))
    assert attack.params.k == 32 and attack.params.s == 0.5 and attack.params.cross_ratio == 0
    assert WaNet().params.k == 4


def test_bad_parameters_are_user_errors() -> None:
    for params in ({"k": 1}, {"s": -1}, {"cross_ratio": -0.5}, {"grid_rescale": 0}):
        with pytest.raises(BenchError):
            WaNet(**params)
