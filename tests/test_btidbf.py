"""BTI-DBF's pieces: model split, feature mask, decoupling objective, generator output, the
purification loss, the inversion route of (P), both modes."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn

from bench.core.device import to_float
from bench.core.errors import BenchError
from bench.core.models import build_model
from bench.nn.train import TrainRecipe, train_classifier
from defenses.base import DefenseContext
from defenses.btidbf import (
    BTIDBF,
    BTIDBFPurify,
    BTIDBFUnlearn,
    PixelGenerator,
    Split,
    decoupling_loss,
    feature_mask,
    fidelity_term,
    switched_inversion_loss,
)

TINY = {"generator_base": 4, "generator_depth": 2, "batch_size": 64, "pretrain_epochs": 1, "mask_epochs": 2,
        "invert_epochs": 1, "rounds": 1, "defend_epochs": 1, "crop_padding": 2, "flip": False}  # fmt: skip


@pytest.fixture(scope="module")
def digits_model(mnist) -> nn.Module:
    """A small CNN trained for one epoch on 1,000 real digits: enough to be far from chance."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, width=8)
    recipe = TrainRecipe(epochs=1, batch_size=64, lr=0.05, schedule="onecycle", crop_padding=0, flip=False)
    train_classifier(model, mnist.train.x[:1000], mnist.train.y[:1000], recipe, torch.device("cpu"), seed=0)
    return model.eval()


@pytest.mark.parametrize("name,channels,size", [("small_cnn", 3, 32), ("cifar_resnet18", 3, 32), ("small_cnn", 1, 28)])
def test_models_split_at_their_feature_map(name: str, channels: int, size: int) -> None:
    model = build_model(name, 10, channels).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        z = model.feature_map(x)
        assert z.dim() == 4 and z.shape[0] == 2
        assert torch.allclose(model.head_from_map(z), model(x), atol=1e-5)


def test_feature_mask_is_in_the_unit_interval() -> None:
    theta = torch.tensor([-50.0, -1.0, 0.0, 1.0, 50.0])
    m = feature_mask(theta)
    assert m.min() >= 0 and m.max() <= 1 and m[2] == 0.5
    assert torch.all(m[1:] >= m[:-1])  # monotone in theta


def test_decoupling_objective_decreases_and_l1_makes_the_mask_sparser(digits_model: nn.Module, mnist) -> None:
    x, y = to_float(mnist.test.x[:256]), mnist.test.y[:256]
    with torch.no_grad():
        feats = digits_model.feature_map(x)

    def optimise(l1: float) -> tuple[float, float, Tensor]:
        theta = torch.randn(feats.shape[1:], generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=1e-2)
        start = decoupling_loss(feature_mask(theta), feats, y, digits_model.head_from_map, l1).item()
        for _ in range(100):
            loss = decoupling_loss(feature_mask(theta), feats, y, digits_model.head_from_map, l1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        end = decoupling_loss(feature_mask(theta), feats, y, digits_model.head_from_map, l1).item()
        return start, end, feature_mask(theta).detach()

    start, end, mask = optimise(0.0)
    assert end < start - 0.25
    assert mask.shape == feats.shape[1:] and mask.min() >= 0 and mask.max() <= 1
    # m keeps what predicts the label, 1 - m does not
    with torch.no_grad():
        keep = nn.functional.cross_entropy(digits_model.head_from_map(mask * feats), y)
        drop = nn.functional.cross_entropy(digits_model.head_from_map((1 - mask) * feats), y)
    assert keep < drop
    _, _, sparse = optimise(5.0)
    assert sparse.mean() < mask.mean()


class Blowup(nn.Module):
    """A stand-in U-Net with huge outputs, to check the generator's (optional) clamping."""

    def forward(self, z: Tensor) -> Tensor:
        return z * 100 + torch.linspace(-500, 500, z.numel()).view_as(z)


def test_generator_output_is_raw_unless_clamped_and_identity_is_exact() -> None:
    """The public code feeds G's raw output to the classifier; ``clamp`` confines it to [0, 1]."""
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    x = torch.rand(4, 3, 16, 16)
    raw = PixelGenerator(Blowup(), mean, std)(x)
    assert raw.shape == x.shape and raw.min() < -10 and raw.max() > 10
    wild = PixelGenerator(Blowup(), mean, std, clamp=True)(x)
    assert wild.shape == x.shape and wild.min() >= 0 and wild.max() <= 1
    assert (wild == 0).any() and (wild == 1).any() and torch.equal(wild, raw.clamp(0, 1))
    identity = PixelGenerator(nn.Identity(), mean, std)
    assert torch.allclose(identity(x), x, atol=1e-6)
    noisy = identity(x, noise=0.03, gen=torch.Generator().manual_seed(0))
    assert 0 < (noisy - x).abs().max() < 0.2  # the noise is added in the normalised space
    assert identity.normalised_mse(x + std.view(1, 3, 1, 1), x).item() == pytest.approx(1.0, rel=1e-5)


def test_mixed_batches_replace_ten_percent_plus_one(digits_model: nn.Module, mnist) -> None:
    defense = BTIDBFUnlearn(**TINY)
    defense.bind(digits_model, torch.device("cpu"), seed=0)
    images, labels = to_float(mnist.test.x[:50]), mnist.test.y[:50]
    seen: list[int] = []

    class Marker(nn.Module):
        def forward(self, x: Tensor, *args: object) -> Tensor:
            seen.append(x.shape[0])
            return torch.zeros_like(x)

    split = Split(digits_model.feature_map, digits_model.head_from_map)
    loss = defense.mixed_batch_loss(split, Marker(), images, labels)  # type: ignore[arg-type]
    assert seen == [6]  # int(0.1 * 50) + 1, as in the public code
    assert torch.isfinite(loss)


def test_both_modes_fit_round_trip_and_leave_the_frozen_model_alone(digits_model: nn.Module, mnist) -> None:
    benign = mnist.train.subset(torch.arange(1000, 1128))
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    x = to_float(mnist.test.x[:64])
    variants = ((BTIDBFUnlearn, {"rounds": 1}), (BTIDBFPurify, {"rounds": 2, "generator_norm": "batch"}))
    for cls, extra in variants:  # round 2 also pulls G towards the detected target
        defense = cls(**{**TINY, **extra})
        defense.bind(digits_model, torch.device("cpu"), seed=1)
        defense.fit(benign, torch.Generator().manual_seed(0))
        assert defense.detected_target is not None and 0 <= defense.detected_target < 10
        inverted = defense.invert_images(x)
        assert inverted.shape == x.shape and torch.isfinite(inverted).all()
        state = defense.state()
        twin = cls(**{**TINY, **extra})
        twin.bind(digits_model, torch.device("cpu"), seed=1)
        twin.load_state(state)
        defense.bind(digits_model, torch.device("cpu"), seed=1)  # same noise stream for both
        defense.load_state(state)
        assert torch.equal(defense.predict(x), twin.predict(x))
        assert twin.detected_target == defense.detected_target
        if cls is BTIDBFUnlearn:
            assert twin.classifier is not digits_model and twin.model is digits_model
            assert any(not torch.equal(a, b) for a, b in zip(state["trained"].values(), before.values()))
        else:
            assert twin.classifier is digits_model
    for key, value in digits_model.state_dict().items():  # the runner's shared model is untouched
        assert torch.equal(value, before[key]), key


def test_modes_and_parameters_are_validated() -> None:
    assert BTIDBF(mode="purify").mode == "purify" and BTIDBF().mode == "unlearn"
    assert BTIDBFUnlearn().benign_fraction == 0.05 and BTIDBFPurify().mode == "purify"
    with pytest.raises(BenchError, match="mode must be 'unlearn'"):
        BTIDBFUnlearn(mode="purify")
    with pytest.raises(BenchError, match="mode must be"):
        BTIDBF(mode="erase")
    with pytest.raises(BenchError, match="rounds"):
        BTIDBFPurify(rounds=0)
    with pytest.raises(BenchError, match="benign_fraction"):
        BTIDBF(benign_fraction=0)
    with pytest.raises(BenchError, match="generator_norm"):
        BTIDBF(generator_norm="layer")
    assert BTIDBFUnlearn.name == "btidbf_u" and BTIDBFPurify.name == "btidbf_p" and BTIDBF.name == "btidbf"


@pytest.mark.parametrize("mse,weight", [(0.2, 100.0), (0.0501, 100.0), (0.0499, 1.0), (0.01, 1.0)])
def test_the_purifiers_fidelity_weight_switches_at_the_bound(mse: float, weight: float) -> None:
    """100 while the image MSE exceeds 0.05, else 1 (the public code's pur_norm_bound)."""
    assert fidelity_term(torch.tensor(mse), 0.05, 100.0, 1.0).item() == pytest.approx(weight * mse)


@pytest.mark.parametrize("pixel,benign,taken", [(0.4, 1.0, "pixel"), (0.2, 4.0, "pixel"), (0.2, 1.0, "features")])
def test_the_inversion_switch_is_on_the_device_and_passes_only_the_taken_branchs_gradient(
    pixel: float, benign: float, taken: str
) -> None:  # fmt: skip
    """Image MSE above 0.3 or benign-feature MSE above 3: the image MSE alone; else
    ``-backdoor + 0.01 * benign``. The branch not taken gets an exactly zero gradient."""
    p, b, d = (torch.tensor(v, requires_grad=True) for v in (pixel, benign, 2.0))
    loss = switched_inversion_loss(p, b, d, norm_bound=0.3, feat_bound=3.0)
    loss.backward()
    want = (pixel, (1.0, 0.0, 0.0)) if taken == "pixel" else (-2.0 + 0.01 * benign, (0.0, 0.01, -1.0))
    assert loss.item() == pytest.approx(want[0])
    assert [t.grad.item() for t in (p, b, d)] == pytest.approx(list(want[1]))


@pytest.mark.parametrize(
    "cls,extra,stage",
    [
        (BTIDBFUnlearn, {"gen_lr": 1e30}, "btidbf_u (unlearn): pretrain generator: the loss became nan at epoch 1; lower gen_lr"),
        (BTIDBFUnlearn, {"unlearn_lr": 1e30}, "btidbf_u (unlearn): unlearn: the loss became nan at epoch 1; lower unlearn_lr"),
        (BTIDBFPurify, {"purify_lr": 1e30}, "btidbf_p (purify): train purifier: the loss became nan at epoch 1; lower purify_lr"),
    ],
)
def test_a_stage_whose_loss_turns_non_finite_fails_the_fit_naming_it(digits_model: nn.Module, mnist, cls, extra,
                                                                     stage: str) -> None:  # fmt: skip
    """A huge learning rate in one stage: one BenchError line naming the stage; the fit installs
    nothing, and a failing pre-training leaves no generator in the context."""
    defense, ctx = cls(**{**TINY, **extra}), DefenseContext()
    defense.bind(digits_model, torch.device("cpu"), seed=0, ctx=ctx)
    with pytest.raises(BenchError, match=f"^{re.escape(stage)}$"):
        defense.fit(mnist.train.subset(torch.arange(1000, 1128)), torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="fit"):
        defense.state()
    assert len(ctx._memory) == (0 if "pretrain" in stage else 1)


class Shift(nn.Module):
    """A stand-in purifier U-Net adding a constant in the normalised space (image MSE = shift**2);
    it records what it was given."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift, self.seen = shift, []

    def forward(self, z: Tensor) -> Tensor:
        self.seen.append(z)
        return z + self.shift


class Dim(nn.Module):
    """A stand-in generator: every generated image is the input at 90% brightness."""

    def forward(self, x: Tensor, *args: object) -> Tensor:
        return 0.9 * x


@pytest.mark.parametrize("shift,weight", [(0.3, 100.0), (0.2, 1.0)])
def test_purify_loss_matches_purified_features_to_the_clean_ones(digits_model: nn.Module, mnist, shift: float,
                                                                weight: float) -> None:  # fmt: skip
    """CE(f(P(mixed))) + MSE(features of P(mixed), features of the clean x) + w * MSE(P(mixed), x)
    with w = 100 above the bound (0.3**2 = 0.09 > 0.05) and 1 below (0.04)."""
    defense = BTIDBFPurify(**TINY, noise=0.0)
    defense.bind(digits_model, torch.device("cpu"), seed=0)
    norm = digits_model.normalize
    purifier = PixelGenerator(Shift(shift), norm.mean, norm.std)
    images, labels = to_float(mnist.test.x[:20]), mnist.test.y[:20]
    loss = defense.purify_loss(purifier, Dim(), images, labels)  # type: ignore[arg-type]
    defense.bind(digits_model, torch.device("cpu"), seed=0)  # the same 3 images replaced again
    mixed = defense._mixed(Dim(), images)  # type: ignore[arg-type]
    assert int((mixed != images).flatten(1).any(1).sum()) == 3  # int(0.1 * 20) + 1 generated images
    with torch.no_grad():
        purified = purifier(mixed)
        image_mse = ((purified - images) / norm.std).pow(2).mean()
        feats = digits_model.feature_map(purified)
        want = (nn.functional.cross_entropy(digits_model.head_from_map(feats), labels)
                + nn.functional.mse_loss(feats, digits_model.feature_map(images)) + weight * image_mse)  # fmt: skip
        against_mixed = want - nn.functional.mse_loss(feats, digits_model.feature_map(images)) \
            + nn.functional.mse_loss(feats, digits_model.feature_map(mixed))  # fmt: skip
    assert image_mse.item() == pytest.approx(shift**2, rel=0.2)  # the dimmed images add a little
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    # the clean batch's features are the reference, not the mixed batch's (the check can fail)
    assert abs(loss.item() - want.item()) < abs(loss.item() - against_mixed.item()) / 10


def test_the_purifier_trains_on_noisy_inputs(digits_model: nn.Module, mnist) -> None:
    defense = BTIDBFPurify(**TINY)  # noise 0.03 in the normalised space
    defense.bind(digits_model, torch.device("cpu"), seed=0)
    norm = digits_model.normalize
    unet = Shift(0.0)
    images, labels = to_float(mnist.test.x[:20]), mnist.test.y[:20]
    defense.purify_loss(PixelGenerator(unet, norm.mean, norm.std), Dim(), images, labels)  # type: ignore[arg-type]
    defense.bind(digits_model, torch.device("cpu"), seed=0)
    clean_input = (defense._mixed(Dim(), images) - norm.mean) / norm.std  # type: ignore[arg-type]
    noise = unet.seen[0] - clean_input
    assert 0.02 < noise.std().item() < 0.04 and abs(noise.mean().item()) < 0.005


def test_from_the_second_round_the_purifier_inverts_through_itself(digits_model: nn.Module, mnist, monkeypatch) -> None:
    """(P): round 1 inverts G alone, later rounds G followed by the purifier; (U) never goes through one."""
    routes: list[tuple[str, bool]] = []
    real = BTIDBF.invert

    def spy(self, g, opt, split, mask, x, gen, target, through=None):
        routes.append((self.mode, through is not None))
        assert through is None or isinstance(through, PixelGenerator) and through is not g
        return real(self, g, opt, split, mask, x, gen, target, through)

    monkeypatch.setattr(BTIDBF, "invert", spy)
    benign = mnist.train.subset(torch.arange(1000, 1064))
    for cls in (BTIDBFPurify, BTIDBFUnlearn):
        defense = cls(**{**TINY, "rounds": 3, "mask_epochs": 1})
        defense.bind(digits_model, torch.device("cpu"), seed=0)
        defense.fit(benign, torch.Generator().manual_seed(0))
    assert routes == [("purify", False), ("purify", True), ("purify", True),
                      ("unlearn", False), ("unlearn", False), ("unlearn", False)]  # fmt: skip
