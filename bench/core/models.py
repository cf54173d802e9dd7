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
from typing import Annotated, Any, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from bench.core.params import PluginParams
from bench.core.plugin import DatasetMeta, Plugin
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


# --------------------------------------------------------------------------- the paper's other architectures
#
# REFINE's attack script (``attack.py`` and ``utils/getmodel.py`` in the authors' repository) trains
# ResNet-50, VGG-16, InceptionV3, DenseNet-121 and a small ViT beside ResNet-18. The classes below
# build them from torchvision's definitions where torchvision has one, adapted the way that script
# adapts them to CIFAR-10, and split every one of them at its last spatial map for t-SNE and BTI-DBF.


def global_pool() -> nn.Sequential:
    """Global average pooling to a flat vector."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def he_conv(cin: int, cout: int, kernel: Any, stride: Any = 1, padding: Any = 0, bias: bool = False) -> nn.Conv2d:
    """A convolution with torchvision's CNN initialisation (He-normal, fan-out; zero bias)."""
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def with_input_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """``conv`` itself, or a fresh one of its shape for ``in_channels`` inputs (torchvision builds
    its stems for RGB; grayscale data needs a one-channel stem)."""
    if conv.in_channels == in_channels:
        return conv
    return he_conv(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.bias is not None)


class MapClassifier(Classifier):
    """A classifier whose feature vector is a fixed function ``pool`` of its last spatial map.

    Subclasses provide :meth:`embed_map` and ``self.pool`` (global average pooling, or VGG's fully
    connected layers); features, logits and the BTI-DBF split then all go through the same
    modules, so ``model(x) == head(features(x)) == head_from_map(feature_map(x))`` by construction.
    """

    pool: nn.Module
    # The smallest image side the architecture can take (its poolings would empty the map below it).
    min_size: ClassVar[int] = 1

    def check(self, meta: DatasetMeta) -> None:
        if min(meta.height, meta.width) < self.min_size:
            self.fail(f"needs images of at least {self.min_size} px, got {meta.height}x{meta.width}")

    def embed(self, x: Tensor) -> Tensor:
        return self.pool(self.embed_map(x))

    def head_from_map(self, z: Tensor) -> Tensor:
        return self.head(self.pool(z))


Variant = Literal["cifar", "imagenet"]


@MODELS.register("resnet50")
class ResNet50(MapClassifier):
    """torchvision's ResNet-50; variant cifar (default): 3x3 stem, no max-pool (REFINE's CIFAR-10 ResNet-50)."""

    class Params(Classifier.Params):
        variant: Variant = Field("cifar", description="cifar: 3x3 stride-1 stem without max-pool (32-px data); "
                                 "imagenet: torchvision's 7x7 stride-2 stem and max-pool (224-px data)")  # fmt: skip
        layers: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt] = Field(
            (3, 4, 6, 3), description="bottleneck blocks per stage (ResNet-50: [3, 4, 6, 3])")
        width_per_group: int = Field(64, ge=1, description="bottleneck inner width of the first stage (64; smaller for CPU runs)")

    params: Params

    def __init__(self, num_classes: int, in_channels: int = 3, params: PluginParams | Mapping[str, Any] | None = None,
                 **raw: Any) -> None:  # fmt: skip
        super().__init__(in_channels, params, **raw)
        from torchvision.models.resnet import Bottleneck, ResNet

        p = self.params
        net = ResNet(Bottleneck, list(p.layers), num_classes=num_classes, width_per_group=p.width_per_group)
        if p.variant == "cifar":
            net.conv1 = he_conv(in_channels, 64, 3, 1, 1)
            net.maxpool = nn.Identity()
        else:
            net.conv1 = with_input_channels(net.conv1, in_channels)
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                  net.layer4)  # fmt: skip
        self.pool = global_pool()
        self.head = net.fc

    def embed_map(self, x: Tensor) -> Tensor:
        return self.body(x)


def init_vgg_weights(module: nn.Module) -> None:
    """VGG's initialisation (torchvision's, and the REFINE code's CIFAR VGG's): He-normal convolutions
    (fan-out), zero biases, N(0, 0.01) linear weights."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


@MODELS.register("vgg16")
class VGG16(MapClassifier):
    """VGG-16 (torchvision's configuration D); variant cifar (default): one linear layer on the 512 channels."""

    class Params(Classifier.Params):
        variant: Variant = Field("cifar", description="cifar: pooled conv features -> linear head (REFINE's CIFAR VGG-16); "
                                 "imagenet: torchvision's 7x7 pooling and two 4096-wide hidden layers")  # fmt: skip
        width: int = Field(64, ge=1, description="channels of the first block (the others have 2x, 4x, 8x, 8x)")
        batch_norm: bool = Field(False, description="batch norm after every convolution (VGG-16-BN); the references use none")
        hidden: int = Field(4096, ge=1, description="width of the imagenet variant's two hidden layers")
        dropout: float = Field(0.5, ge=0, lt=1, description="dropout of the imagenet variant's hidden layers")

    params: Params
    min_size = 32  # five 2x2 max-pools

    def __init__(self, num_classes: int, in_channels: int = 3, params: PluginParams | Mapping[str, Any] | None = None,
                 **raw: Any) -> None:  # fmt: skip
        super().__init__(in_channels, params, **raw)
        from torchvision.models.vgg import cfgs, make_layers

        p = self.params
        cfg = [v if v == "M" else int(v) * p.width // 64 for v in cfgs["D"]]
        self.body = make_layers(cfg, batch_norm=p.batch_norm)
        self.body[0] = with_input_channels(self.body[0], in_channels)
        channels = 8 * p.width
        if p.variant == "cifar":
            # The reference flattens a 1x1 map (32-px input, five max-pools); averaging is the same
            # there and keeps other image sizes working.
            self.pool = global_pool()
            self.head = nn.Linear(channels, num_classes)
        else:
            self.pool = nn.Sequential(
                nn.AdaptiveAvgPool2d(7), nn.Flatten(),
                nn.Linear(channels * 49, p.hidden), nn.ReLU(inplace=True), nn.Dropout(p.dropout),
                nn.Linear(p.hidden, p.hidden), nn.ReLU(inplace=True), nn.Dropout(p.dropout),
            )  # fmt: skip
            self.head = nn.Linear(p.hidden, num_classes)
        init_vgg_weights(self)

    def embed_map(self, x: Tensor) -> Tensor:
        return self.body(x)


@MODELS.register("densenet121")
class DenseNet121(MapClassifier):
    """torchvision's DenseNet-121, unchanged on every image size (as REFINE's script uses it on CIFAR-10)."""

    class Params(Classifier.Params):
        growth_rate: int = Field(32, ge=1, description="channels each dense layer adds")
        block_config: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt] = Field(
            (6, 12, 24, 16), description="dense layers per block (DenseNet-121: [6, 12, 24, 16])")
        num_init_features: int = Field(64, ge=1, description="channels of the stem convolution")
        bn_size: int = Field(4, ge=1, description="bottleneck width factor (x growth_rate)")
        drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout after each dense layer")

    params: Params
    min_size = 29  # a stride-2 stem, a max-pool and three 2x2 average pools

    def __init__(self, num_classes: int, in_channels: int = 3, params: PluginParams | Mapping[str, Any] | None = None,
                 **raw: Any) -> None:  # fmt: skip
        super().__init__(in_channels, params, **raw)
        from torchvision.models.densenet import DenseNet

        p = self.params
        net = DenseNet(p.growth_rate, p.block_config, p.num_init_features, p.bn_size, p.drop_rate, num_classes)
        net.features.conv0 = with_input_channels(net.features.conv0, in_channels)
        # torchvision applies a ReLU after the last batch norm, outside ``features``: it belongs to the map.
        self.body = nn.Sequential(net.features, nn.ReLU())
        self.pool = global_pool()
        self.head = net.classifier

    def embed_map(self, x: Tensor) -> Tensor:
        return self.body(x)


@MODELS.register("inception_v3")
class InceptionV3(MapClassifier):
    """torchvision's InceptionV3 without the auxiliary head; resizes inputs to 96 px (REFINE's CIFAR-10 setting)."""

    class Params(Classifier.Params):
        input_size: int | None = Field(96, ge=75, description="resize inputs (bilinear) to this square size "
                                       "first (REFINE: 96 for CIFAR-10); null: use them as they are")  # fmt: skip
        dropout: float = Field(0.5, ge=0, lt=1, description="dropout before the head")

    params: Params
    min_size = 75  # below this, InceptionV3's strided convolutions and pools empty the map

    def __init__(self, num_classes: int, in_channels: int = 3, params: PluginParams | Mapping[str, Any] | None = None,
                 **raw: Any) -> None:  # fmt: skip
        super().__init__(in_channels, params, **raw)
        from torchvision.models.inception import Inception3

        # The auxiliary classifier is left out, as in REFINE's script (aux_logits=False): it only
        # adds a training loss, and a second output would break the one-logits model contract.
        net = Inception3(num_classes, aux_logits=False, transform_input=False, init_weights=True,
                         dropout=self.params.dropout)  # fmt: skip
        net.Conv2d_1a_3x3.conv = with_input_channels(net.Conv2d_1a_3x3.conv, in_channels)
        names = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                 "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")  # torchvision's order in Inception3._forward  # fmt: skip
        self.body = nn.Sequential(*(getattr(net, name) for name in names))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(self.params.dropout))
        self.head = net.fc

    def check(self, meta: DatasetMeta) -> None:
        if self.params.input_size is None and min(meta.height, meta.width) < self.min_size:
            self.fail(f"needs images of at least {self.min_size} px, got {meta.height}x{meta.width}; "
                      "set input_size (96 for 32-px images, as REFINE's script)")  # fmt: skip

    def embed_map(self, x: Tensor) -> Tensor:
        # Resizing after the per-channel normalisation equals resizing before it (interpolation
        # weights sum to one), so the trigger is drawn at the data's own size, as in the reference.
        size = self.params.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.body(x)


# One-pixel shifts (left, right, up, down) of Shifted Patch Tokenization, as ``F.pad`` amounts.
PIXEL_SHIFTS = ((1, -1, 0, 0), (-1, 1, 0, 0), (0, 0, 1, -1), (0, 0, -1, 1))


class PatchTokens(nn.Module):
    """Non-overlapping p x p patches -> layer norm -> linear tokens; with ``shifted``, each patch also
    carries the same patch of the image shifted by one pixel in each of four directions (Shifted
    Patch Tokenization, Lee et al. 2021, "Vision Transformer for Small-Size Datasets")."""

    def __init__(self, channels: int, patch: int, dim: int, shifted: bool) -> None:
        super().__init__()
        self.patch = patch
        self.shifted = shifted
        patch_dim = patch * patch * channels * (1 + len(PIXEL_SHIFTS) if shifted else 1)
        self.norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.shifted:
            x = torch.cat([x, *(F.pad(x, shift) for shift in PIXEL_SHIFTS)], dim=1)
        n, c, h, w = x.shape
        p = self.patch
        patches = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), -1)
        return self.proj(self.norm(patches))


class SelfAttention(nn.Module):
    """Multi-head self-attention; with ``locality``, Locality Self-Attention (same paper): a learned
    softmax temperature and no attention of a token to itself."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, locality: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))
        self.locality = locality
        self.scale = dim_head**-0.5
        if locality:
            self.log_temperature = nn.Parameter(torch.tensor(self.scale).log())

    def forward(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scale, mask = self.scale, None
        if self.locality:
            q, scale = q * self.log_temperature.exp(), 1.0
            mask = ~torch.eye(t, dtype=torch.bool, device=x.device)  # True: may attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.out(out.transpose(1, 2).reshape(n, t, -1))


class TransformerBlock(nn.Module):
    """Pre-norm encoder block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU MLP, dropout)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float, locality: bool) -> None:
        super().__init__()
        from torchvision.ops import MLP

        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dim_head, dropout, locality)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, [mlp_dim, dim], activation_layer=nn.GELU, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@MODELS.register("vit_small")
class ViTSmall(MapClassifier):
    """The REFINE code's ViT: 8x8 patches of size/8, dim 512, depth 6, 8 heads, MLP 512, shifted patches, LSA."""

    class Params(Classifier.Params):
        image_size: int = Field(32, ge=1, description="side of the (square) input images; must match the data")
        patch_size: int | None = Field(None, ge=1, description="patch side; null: image_size / 8 (REFINE's script)")
        dim: int = Field(512, ge=1, description="token width")
        depth: int = Field(6, ge=1, description="transformer blocks")
        heads: int = Field(8, ge=1, description="attention heads")
        dim_head: int = Field(64, ge=1, description="width of each attention head")
        mlp_dim: int = Field(512, ge=1, description="hidden width of each block's MLP")
        dropout: float = Field(0.1, ge=0, lt=1, description="dropout in attention outputs and MLPs")
        emb_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the token embeddings")
        shifted_patches: bool = Field(True, description="Shifted Patch Tokenization (the reference); false: plain patches")
        locality_attention: bool = Field(True, description="Locality Self-Attention (the reference); false: plain attention")

    params: Params

    def __init__(self, num_classes: int, in_channels: int = 3, params: PluginParams | Mapping[str, Any] | None = None,
                 **raw: Any) -> None:  # fmt: skip
        super().__init__(in_channels, params, **raw)
        p = self.params
        patch = p.patch_size or p.image_size // 8
        if patch < 1 or p.image_size % patch:
            self.fail(f"the patch size ({patch}) must divide image_size ({p.image_size}); set patch_size")
        self.tokens = PatchTokens(in_channels, patch, p.dim, p.shifted_patches)
        self.pos_embedding = nn.Parameter(torch.randn(1, (p.image_size // patch) ** 2 + 1, p.dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, p.dim))
        self.emb_dropout = nn.Dropout(p.emb_dropout)
        self.blocks = nn.Sequential(*(TransformerBlock(p.dim, p.heads, p.dim_head, p.mlp_dim, p.dropout,
                                                       p.locality_attention) for _ in range(p.depth)))  # fmt: skip
        # The class token is the only token the head reads: as a 1x1 "map" it gives BTI-DBF a mask
        # over its channels. The reference splits there too (its feature hook returns the token
        # before the head's layer norm), so the layer norm belongs to the pooling, not the map.
        self.pool = nn.Sequential(nn.Flatten(), nn.LayerNorm(p.dim))
        self.head = nn.Linear(p.dim, num_classes)

    def check(self, meta: DatasetMeta) -> None:
        size = self.params.image_size
        if (meta.height, meta.width) != (size, size):
            advice = f"set image_size: {meta.height}" if meta.height == meta.width else "it needs square images"
            self.fail(f"image_size is {size} but the data holds {meta.height}x{meta.width} images; {advice}")

    def embed_map(self, x: Tensor) -> Tensor:
        tokens = self.tokens(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = self.blocks(self.emb_dropout(tokens + self.pos_embedding))
        return tokens[:, 0, :, None, None]


def build_model(name: str, num_classes: int, in_channels: int, **params: Any) -> Classifier:
    """Instantiate a registered model for ``num_classes`` classes and ``in_channels`` channels."""
    return MODELS.create(name, params, num_classes=num_classes, in_channels=in_channels)
