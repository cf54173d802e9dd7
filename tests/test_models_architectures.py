"""The REFINE attack script's other architectures: ResNet-50, VGG-16, DenseNet-121, InceptionV3, ViT.

Each is trained for a few steps on real CIFAR-10 images at reduced width (the same code at the
paper's width is the default), and must keep the split that t-SNE and BTI-DBF rely on:
``model(x) == head(features(x)) == head_from_map(feature_map(x))``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bench.core.data import DataSplit
from bench.core.errors import BenchError
from bench.core.models import build_model
from bench.core.plugin import DatasetMeta
from tests.conftest import REPO, sample

# Reduced widths and depths for a CPU test; every value here is a model parameter.
SMALL = {
    "resnet50": {"layers": [1, 1, 1, 1], "width_per_group": 4},
    "vgg16": {"width": 8},
    "densenet121": {"growth_rate": 8, "block_config": [2, 2, 2, 2], "num_init_features": 16},
    "inception_v3": {"input_size": 75, "dropout": 0.0},  # torchvision has no width knob: its smallest input
    "vit_small": {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "mlp_dim": 64, "dropout": 0.0,
                  "emb_dropout": 0.0},  # fmt: skip
}
NEW_MODELS = tuple(SMALL)


def split_gap(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Largest differences of the two feature splits from the logits (eval mode)."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        via_features = model.head(model.features(x))
        via_map = model.head_from_map(model.feature_map(x))
    assert logits.shape == (x.shape[0], 10) and torch.isfinite(logits).all()
    return (logits - via_features).abs().max().item(), (logits - via_map).abs().max().item()


@pytest.mark.parametrize("name", NEW_MODELS)
def test_a_few_steps_on_real_cifar_lower_the_loss_and_keep_the_split(name: str, cifar10: DataSplit) -> None:
    torch.manual_seed(0)
    batch = sample(cifar10.train, 12, seed=1)
    x, y = batch.x.float() / 255, batch.y
    model = build_model(name, num_classes=10, in_channels=3, **SMALL[name])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    first = F.cross_entropy(model(x), y).item()
    for _ in range(4):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    last = F.cross_entropy(model(x), y).item()
    assert last < first, f"{name}: loss {first:.3f} -> {last:.3f} on one repeated real batch"
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged, f"{name}: parameters untouched by training: {unchanged}"

    test_x = sample(cifar10.test, 4).x.float() / 255
    gap_features, gap_map = split_gap(model, test_x)
    assert gap_features < 1e-5 and gap_map < 1e-5


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("resnet50", {"variant": "imagenet", "layers": [1, 1, 1, 1], "width_per_group": 8}),
        ("vgg16", {"variant": "imagenet", "width": 4, "hidden": 32}),
        ("densenet121", {"growth_rate": 4, "block_config": [1, 1, 1, 1], "num_init_features": 8}),
        ("inception_v3", {"input_size": None}),
        ("vit_small", {"image_size": 224, "dim": 32, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32}),
    ],
)
def test_the_224_px_variants_keep_the_split(name: str, params: dict) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, **params)
    model.check(DatasetMeta("imagenet50", 10, 3, 224, 224))
    x = torch.rand(1, 3, 224, 224)
    gap_features, gap_map = split_gap(model, x)
    assert gap_features < 1e-5 and gap_map < 1e-5
    assert model.feature_map(x).shape[-1] == (1 if name == "vit_small" else 5 if name == "inception_v3" else 7)


def test_the_vit_takes_the_reference_shape() -> None:
    """patch = image size / 8 (4 on CIFAR, 28 on 224 px), 8 heads, depth 6, dim 512, MLP 512."""
    vit = build_model("vit_small", num_classes=10, in_channels=3)
    assert vit.pos_embedding.shape == (1, 8 * 8 + 1, 512) and len(vit.blocks) == 6
    assert vit.blocks[0].attn.heads == 8 and vit.blocks[0].mlp[0].out_features == 512
    # Shifted patches: each token sees its 4 x 4 patch of the image and of its four one-pixel shifts.
    assert vit.tokens.proj.in_features == 4 * 4 * 3 * 5
    big = build_model("vit_small", num_classes=50, in_channels=3, image_size=224)
    assert big.pos_embedding.shape == (1, 8 * 8 + 1, 512) and big.tokens.patch == 28


def test_the_cifar_variants_follow_the_reference_shapes() -> None:
    """CIFAR ResNet-50: 3x3 stride-1 stem, no max-pool, 4x4 last map; CIFAR VGG-16: one linear layer
    on 512 channels; InceptionV3: resized to 96 px, no auxiliary head."""
    x = torch.rand(1, 3, 32, 32)
    resnet = build_model("resnet50", num_classes=10, in_channels=3).eval()
    assert resnet.body[0].kernel_size == (3, 3) and resnet.body[0].stride == (1, 1)
    assert resnet.feature_map(x).shape == (1, 2048, 4, 4)
    vgg = build_model("vgg16", num_classes=10, in_channels=3)
    assert vgg.head.in_features == 512 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in vgg.modules())
    assert sum(isinstance(m, torch.nn.Conv2d) for m in vgg.modules()) == 13
    inception = build_model("inception_v3", num_classes=10, in_channels=3).eval()
    assert inception.params.input_size == 96 and not any("Aux" in type(m).__name__ for m in inception.modules())
    assert inception.feature_map(x).shape == (1, 2048, 1, 1)


@pytest.mark.parametrize(
    ("name", "params", "meta", "message"),
    [
        ("vgg16", {}, DatasetMeta("tiny", 10, 3, 16, 16), "needs images of at least 32 px, got 16x16"),
        ("densenet121", {}, DatasetMeta("tiny", 10, 3, 28, 28), "needs images of at least 29 px, got 28x28"),
        ("inception_v3", {"input_size": None}, DatasetMeta("cifar10", 10, 3, 32, 32), "set input_size"),
        ("vit_small", {}, DatasetMeta("imagenet50", 50, 3, 224, 224), "set image_size: 224"),
    ],
)
def test_sizes_a_model_cannot_take_are_refused_before_any_work(name, params, meta, message) -> None:
    model = build_model(name, num_classes=meta.num_classes, in_channels=3, **params)
    with pytest.raises(BenchError, match=message):
        model.check(meta)


def test_a_patch_that_does_not_divide_the_image_is_one_line() -> None:
    with pytest.raises(BenchError, match=r"patch size \(5\) must divide image_size \(32\)"):
        build_model("vit_small", num_classes=10, in_channels=3, patch_size=5)


def test_grayscale_data_gets_a_one_channel_stem() -> None:
    for name, params in SMALL.items():
        model = build_model(name, num_classes=10, in_channels=1, **params).eval()
        with torch.no_grad():
            assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10), name


def test_list_shows_the_new_models() -> None:
    out = subprocess.run([sys.executable, "run_bench.py", "list"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in NEW_MODELS:
        assert name in out.stdout.split(), name
