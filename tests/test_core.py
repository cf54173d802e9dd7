"""Augmentation, ShrinkPad, metrics, models and the registry on small tensors and real images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.core.errors import BenchError, UnknownNameError
from bench.core.metrics import backdoor_metrics, predict_labels
from bench.core.models import build_model
from bench.core.registry import ATTACKS, DEFENSES
from bench.nn import augment
from defenses.shrinkpad import ShrinkPad, shrink_pad


def test_shift_images_moves_each_image_by_its_own_offset():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    out = augment.shift_images(x, torch.tensor([1, 0]), torch.tensor([0, -2]))
    assert torch.equal(out[0, 0, 1:], x[0, 0, :3]) and bool((out[0, 0, 0] == 0).all())
    assert torch.equal(out[1, 0, :, :2], x[1, 0, :, 2:]) and bool((out[1, 0, :, 2:] == 0).all())


def test_random_flip_and_crop_are_per_image(cifar10):
    x = cifar10.test.x[:256].float() / 255
    gen = torch.Generator().manual_seed(0)
    flipped = augment.random_flip(x, gen)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0.3 < same.float().mean() < 0.7
    cropped = augment.random_crop(x, 4, gen)
    assert cropped.shape == x.shape and (cropped != x).flatten(1).any(1).float().mean() > 0.9


def test_shrinkpad_keeps_size_zero_pads_and_varies_offset(cifar10):
    x = cifar10.test.x[:64].float() / 255 + 0.01  # no exact zeros in the images themselves
    out = shrink_pad(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    zero = (out == 0).all(1)  # (N, H, W) padded pixels
    assert bool((zero.flatten(1).sum(1) == 32 * 32 - 28 * 28).all())
    first_rows = zero.all(2).float().argmin(1)  # first non-padded row per image
    assert len(torch.unique(first_rows)) > 1
    assert torch.equal(shrink_pad(x, 0, torch.Generator()), x)


def test_shrinkpad_pad_is_its_intensity_and_validated():
    assert ShrinkPad(pad=6).intensity == 6 and ShrinkPad.intensity_param == "pad"
    with pytest.raises(BenchError, match="^shrinkpad: pad must be >= 0, got -1$"):
        ShrinkPad(pad=-1)


class _Fixed(nn.Module):
    """Predicts the label stored in the first pixel: lets a test set predictions exactly."""

    def forward(self, x):
        return nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long(), 10).float()


def test_metrics_ba_asr_ra_as_defined():
    clean_y = torch.tensor([0, 1, 2, 3])
    clean_x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    clean_x[:, 0, 0, 0] = torch.tensor([0, 1, 9, 3], dtype=torch.uint8)  # 3 of 4 right
    pois_y = torch.tensor([1, 2, 3, 4, 5])
    pois_x = torch.zeros(5, 1, 2, 2, dtype=torch.uint8)
    pois_x[:, 0, 0, 0] = torch.tensor([0, 0, 3, 4, 0], dtype=torch.uint8)  # 3 hit target 0, 2 keep label
    m = backdoor_metrics(_Fixed(), clean_x, clean_y, pois_x, pois_y, 0, torch.device("cpu"), batch_size=2)
    assert m == {"ba": 75.0, "asr": 60.0, "ra": 40.0}
    with pytest.raises(ValueError, match="target-class"):
        backdoor_metrics(_Fixed(), clean_x, clean_y, pois_x, torch.tensor([0, 2, 3, 4, 5]), 0, torch.device("cpu"))


def test_predictions_run_in_inference_mode_in_fp32_on_the_cpu():
    seen = []

    def predict(x):
        seen.append((torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"), x.shape[0]))
        return _Fixed()(x)

    images = torch.zeros(5, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    labels = predict_labels(predict, images, torch.device("cpu"), batch_size=2)
    assert labels.tolist() == [3, 1, 4, 1, 5]
    assert seen == [(True, False, 2), (True, False, 2), (True, False, 1)]
    assert not labels.is_inference()  # an ordinary tensor for the caller


@pytest.mark.parametrize("name,shape", [("small_cnn", (2, 3, 32, 32)), ("cifar_resnet18", (2, 3, 32, 32)),
                                        ("resnet18", (2, 3, 64, 64)), ("small_cnn", (2, 1, 28, 28))])  # fmt: skip
def test_models_take_unit_range_images_and_expose_features(name, shape):
    model = build_model(name, num_classes=7, in_channels=shape[1]).eval()
    x = torch.rand(shape)
    feats = model.features(x)
    assert feats.dim() == 2 and feats.shape[0] == 2
    assert torch.allclose(model(x), model.head(feats), atol=1e-5)
    assert model(x).shape == (2, 7)


def test_model_normalization_is_a_parameter_with_the_data_statistics_as_default():
    reference = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}
    given = build_model("cifar_resnet18", num_classes=10, in_channels=3, normalization=reference)
    default = build_model("cifar_resnet18", num_classes=10, in_channels=3)
    assert given.normalize.std.flatten().tolist() == pytest.approx(reference["std"])
    assert given.normalize.mean.flatten().tolist() == pytest.approx(reference["mean"])
    assert default.normalize.std.flatten().tolist() == pytest.approx([0.2470, 0.2435, 0.2616])
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(given.normalize(x), (x - torch.tensor(reference["mean"]).view(1, 3, 1, 1))
                               / torch.tensor(reference["std"]).view(1, 3, 1, 1))  # fmt: skip
    with pytest.raises(BenchError, match="normalization is for 3 channels but the images have 1"):
        build_model("small_cnn", num_classes=10, in_channels=1, normalization=reference)
    with pytest.raises(BenchError, match="as many std values as mean values"):
        build_model("small_cnn", num_classes=10, in_channels=3, normalization={"mean": [0.5], "std": [0.2, 0.2]})


def test_registry_suggests_the_closest_name():
    with pytest.raises(UnknownNameError, match="Did you mean 'badnets'.*Valid attacks: .*blended"):
        ATTACKS.get("badnet")
    assert "shrinkpad" in DEFENSES.names() and "none" in DEFENSES.names()
