"""Image classifiers, registered by name.

Input convention, stated once and kept everywhere: **every model takes float images in [0, 1]**
(N, C, H, W). Per-channel normalisation lives inside the model (:class:`Normalize` as its first
layer), so defenses that transform images -- REFINE's U-Net, ShrinkPad, BDMAE's restorations --
work in plain pixel space and feed their output straight to the model.

Every model exposes ``features(x)`` (the penultimate-layer representation, used for t-SNE and by
feature-space defenses) and ``head`` (the last linear layer): ``model(x) == head(features(x))``.

Models are plugins like attacks and defenses (:mod:`bench.core.plugin`): a model's own
parameters (a width, say) are declared in its ``Params``; the class count and input channels
come from the dataset and are passed beside them (:func:`build_model`).

Every model's ``normalization`` parameter sets the per-channel mean and std. The default is the
data's own statistics (:data:`DEFAULT_MEAN`, :data:`DEFAULT_STD`: CIFAR-10's pixel std is
0.2470, 0.2435, 0.2616), because they are what normalisation means and they leave every
existing grid's results as they were (the Adaptive-Patch authors' code uses them too); the
REFINE code, BackdoorBox and most public CIFAR code use std (0.2023, 0.1994, 0.2010) -- a widely
copied constant, not the pixel std -- which the paper grids set explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from bench.core.params import PluginParams
from bench.core.plugin import Plugin
from bench.core.registry import MODELS

# Per-channel statistics of the data, the default normalisation (a model's ``normalization`` overrides them).
DEFAULT_MEAN = {1: (0.1307,), 3: (0.4914, 0.4822, 0.4465)}
DEFAULT_STD = {1: (0.3081,), 3: (0.2470, 0.2435, 0.2616)}


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as a layer so that it travels with the model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Normalization(PluginParams):
    """Per-channel constants of a model's input normalisation."""

    mean: list[float] = Field(min_length=1, description="per-channel mean subtracted from images in [0, 1]")
    std: list[Annotated[float, Field(gt=0)]] = Field(min_length=1, description="per-channel std divided by")

    @model_validator(mode="after")
    def _same_length(self) -> Normalization:
        if len(self.mean) != len(self.std):
            raise ValueError("must give as many std values as mean values (one of each per channel)")
        return self


class Classifier(nn.Module, Plugin):
    """Base class: normalisation, a feature extractor ending in a vector, and a linear head."""

    class Params(PluginParams):
        normalization: Normalization | None = Field(
            None, description="per-channel mean and std of the input normalisation; null: the data's statistics "
                              "(CIFAR-10: mean 0.4914, 0.4822, 0.4465, std 0.2470, 0.2435, 0.2616)")  # fmt: skip

    params: Params

    def __init__(self, in_channels: int, params: PluginParams | Mapping[str, Any] | None = None, **raw: Any) -> None:
        nn.Module.__init__(self)
        self.params = self.parse_params(params, **raw)
        given = self.params.normalization
        if given is None:
            mean = DEFAULT_MEAN.get(in_channels, (0.5,) * in_channels)
            std = DEFAULT_STD.get(in_channels, (0.25,) * in_channels)
        elif len(given.mean) != in_channels:
            n = len(given.mean)
            self.fail(f"normalization is for {n} channel{'s' if n != 1 else ''} but the images have {in_channels}")
        else:
            mean, std = given.mean, given.std
        self.normalize = Normalize(mean, std)
        self.head: nn.Linear

    def embed(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features of images in [0, 1]."""
        return self.embed(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def embed_map(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def feature_map(self, x: Tensor) -> Tensor:
        """The last spatial feature map (N, C, h, w), before global pooling, of images in [0, 1].

        Defenses that mask feature channels and positions (BTI-DBF) split the model here:
        ``model(x) == model.head_from_map(model.feature_map(x))``.
        """
        return self.embed_map(self.normalize(x))

    def head_from_map(self, z: Tensor) -> Tensor:
        """Logits from a :meth:`feature_map`: global average pooling, then the head."""
        return self.head(z.mean(dim=(2, 3)))


@MODELS.register("small_cnn")
class SmallCNN(Classifier):
    """A 6-conv VGG-style CNN with batch norm: minutes on a CPU, ~80% on CIFAR-10."""

    class Params(Classifier.Params):
        width: int = Field(32, ge=1, description="channels of the first block (the others have 2x and 4x)")

    params: Params

    def __init__(self, num_classes: int, in_channels: int = 3, params: PluginParams | Mapping[str, Any] | None = None,
                 **raw: Any) -> None:  # fmt: skip
        super().__init__(in_channels, params, **raw)
        width = self.params.width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(
            block(in_channels, width), block(width, 2 * width), block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.body(x)

    def embed_map(self, x: Tensor) -> Tensor:
        return self.body[:-2](x)  # the conv blocks, without pooling and flattening


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@MODELS.register("cifar_resnet18")
class CifarResNet18(Classifier):
    """ResNet-18 for 32-px images: 3x3 stem, no max-pool (the REFINE paper's backbone)."""

    def __init__(self, num_classes: int, in_channels: int = 3, params: PluginParams | Mapping[str, Any] | None = None,
                 **raw: Any) -> None:  # fmt: skip
        super().__init__(in_channels, params, **raw)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(512, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.pool(self.layers(self.stem(x)))

    def embed_map(self, x: Tensor) -> Tensor:
        return self.layers(self.stem(x))


@MODELS.register("resnet18")
class TorchvisionResNet18(Classifier):
    """torchvision's ImageNet-style ResNet-18 (7x7 stem + max-pool) for 224-px data; no weights."""

    def __init__(self, num_classes: int, in_channels: int = 3, params: PluginParams | Mapping[str, Any] | None = None,
                 **raw: Any) -> None:  # fmt: skip
        super().__init__(in_channels, params, **raw)
        from torchvision.models import resnet18

        net = resnet18(weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.head = net.fc
        net.fc = nn.Identity()
        self.net = net

    def embed(self, x: Tensor) -> Tensor:
        return self.net(x)

    def embed_map(self, x: Tensor) -> Tensor:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def build_model(name: str, num_classes: int, in_channels: int, **params: Any) -> Classifier:
    """Instantiate a registered model for ``num_classes`` classes and ``in_channels`` channels."""
    return MODELS.create(name, params, num_classes=num_classes, in_channels=in_channels)
