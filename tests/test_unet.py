"""The shared U-Net: the two public-code presets (exact parameter counts, layer layout), shapes on
any image size, norms, activations, upsampling, bad configurations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.nn.unet import UNet, btidbf_unet, refine_unet


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def block_widths(block: nn.Sequential) -> tuple[int, int, int]:
    """(input, middle, output) width of a two-convolution block."""
    first, second = block[0], block[3]
    return first.in_channels, first.out_channels, second.out_channels


@pytest.mark.parametrize("channels,width,count", [(3, 64, 17_267_523), (3, 32, 4_320_675), (3, 8, 271_467),
                                                  (1, 8, 271_305)])  # fmt: skip
def test_refine_preset_has_the_reference_parameter_count(channels: int, width: int, count: int) -> None:
    """The REFINE code's UNetLittle(n_channels, n_classes=n_channels, first_channels=c), counted there."""
    assert n_params(refine_unet(channels, width)) == count


def test_refine_preset_layout_halves_each_decoder_input() -> None:
    net = refine_unet(3, 8)
    assert [block_widths(b)[2] for b in [net.stem, *net.down]] == [8, 16, 32, 64, 64]  # c, 2c, 4c, 8c, 8c
    assert [block_widths(level.block) for level in net.up] == [(128, 64, 32), (64, 32, 16), (32, 16, 8), (16, 8, 8)]
    assert all(level.up is None for level in net.up)  # bilinear: no upsampling weights
    kinds = {type(m) for m in net.modules()}
    assert nn.BatchNorm2d in kinds and nn.ReLU in kinds and nn.ConvTranspose2d not in kinds


def test_refine_preset_upsamples_bilinearly_with_aligned_corners() -> None:
    """A decoder level's upsampling equals F.interpolate(..., align_corners=True) of its input."""
    net = refine_unet(1, 2).eval()
    seen: dict[str, torch.Tensor] = {}
    level = net.up[0]

    def keep(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[name] = args[0]

        return hook

    level.block.register_forward_pre_hook(keep("cat"))
    level.register_forward_pre_hook(keep("deep"))
    net(torch.rand(1, 1, 32, 32))
    deep = seen["deep"]
    upsampled = seen["cat"][:, -deep.shape[1]:]
    want = nn.functional.interpolate(deep, scale_factor=2, mode="bilinear", align_corners=True)
    assert torch.allclose(upsampled, want, atol=1e-6)
    assert not torch.allclose(upsampled, nn.functional.interpolate(deep, scale_factor=2, mode="bilinear"), atol=1e-3)


@pytest.mark.parametrize("channels,count", [(3, 10_987_011), (1, 10_986_369)])
def test_btidbf_preset_has_the_reference_parameter_count(channels: int, count: int) -> None:
    """The BTI-DBF code's UNet(n_channels, num_classes=n_channels, base_filter_num=32, num_blocks=4)
    holds 14,121,411 parameters (RGB), 3,134,400 of them in an interpolation branch of its decoder
    blocks that forward() never calls; the rest is this preset."""
    assert n_params(btidbf_unet(channels)) == count
    assert count + 3_134_400 == {3: 14_121_411, 1: 14_120_769}[channels]


def test_btidbf_preset_layout() -> None:
    net = btidbf_unet(3, base=32, depth=4)
    assert [block_widths(b)[2] for b in [net.stem, *net.down]] == [32, 64, 128, 256, 512]
    assert [block_widths(level.block) for level in net.up] == [(768, 256, 256), (384, 128, 128), (192, 64, 64),
                                                               (96, 32, 32)]  # fmt: skip
    transposed = [level.up[0] for level in net.up]
    assert all(isinstance(t, nn.ConvTranspose2d) and t.in_channels == t.out_channels for t in transposed)
    assert all(t.kernel_size == (3, 3) and t.stride == (2, 2) for t in transposed)
    norms = [m for m in net.modules() if isinstance(m, (nn.InstanceNorm2d, nn.BatchNorm2d))]
    assert norms and all(isinstance(m, nn.InstanceNorm2d) and m.affine for m in norms)
    slopes = {m.negative_slope for m in net.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.01}
    assert [block_widths(b)[2] for b in [btidbf_unet(3, base=256, depth=3).stem, *btidbf_unet(3, 256, 3).down]] \
        == [256, 512, 512, 1024]  # widths capped at 512, the bottleneck twice the last  # fmt: skip


@pytest.mark.parametrize("size", [32, 28, 17])
@pytest.mark.parametrize("build", [lambda: refine_unet(3, 4), lambda: btidbf_unet(3, base=4, depth=3)])
def test_output_keeps_the_input_shape_and_every_weight_gets_a_gradient(size: int, build) -> None:
    net = build().train()
    out = net(torch.rand(2, 3, size, size + 3))
    assert out.shape == (2, 3, size, size + 3)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_norm_and_activation_choices_build_the_right_layers() -> None:
    inst = UNet(3, 3, [4, 8, 8], [4, 4], norm="instance", activation="leaky_relu", negative_slope=0.1)
    kinds = {type(m) for m in inst.modules()}
    assert nn.InstanceNorm2d in kinds and nn.LeakyReLU in kinds
    assert nn.BatchNorm2d not in kinds and nn.ReLU not in kinds
    assert all(m.negative_slope == 0.1 for m in inst.modules() if isinstance(m, nn.LeakyReLU))
    plain = UNet(3, 3, [4, 8, 8], [4, 4], norm="none")
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) for m in plain.modules())


def test_bad_choices_raise() -> None:
    with pytest.raises(ValueError, match="norm"):
        UNet(3, 3, [4, 8], [4], norm="group")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="activation"):
        UNet(3, 3, [4, 8], [4], activation="gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="upsample"):
        UNet(3, 3, [4, 8], [4], upsample="nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decoder width per down level"):
        UNet(3, 3, [4, 8, 16], [4])
