"""The shared U-Net: widths, shapes on any image size, norms, activations, output activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.nn.unet import UNet


def conv_widths(net: UNet) -> list[int]:
    """Output width of each encoder level (stem, then the down levels)."""
    return [block[0].out_channels for block in [net.stem, *net.down]]


def test_encoder_widths_are_c_2c_4c_8c_8c() -> None:
    net = UNet(base=8)
    assert conv_widths(net) == [8, 16, 32, 64, 64]
    assert [block[0].out_channels for block in net.up] == [32, 16, 8, 8]


@pytest.mark.parametrize("size", [32, 28, 17])
def test_output_keeps_the_input_shape(size: int) -> None:
    net = UNet(in_channels=3, out_channels=2, base=4, norm="instance", activation="leaky_relu").train()
    out = net(torch.rand(2, 3, size, size + 3))
    assert out.shape == (2, 2, size, size + 3)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_norm_and_activation_choices_build_the_right_layers() -> None:
    inst = UNet(base=4, norm="instance", activation="leaky_relu", negative_slope=0.1)
    kinds = {type(m) for m in inst.modules()}
    assert nn.InstanceNorm2d in kinds and nn.LeakyReLU in kinds
    assert nn.BatchNorm2d not in kinds and nn.ReLU not in kinds
    assert all(m.negative_slope == 0.1 for m in inst.modules() if isinstance(m, nn.LeakyReLU))
    plain = UNet(base=4, norm="none")
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) for m in plain.modules())


def test_bad_choices_raise() -> None:
    with pytest.raises(ValueError, match="norm"):
        UNet(norm="group")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="activation"):
        UNet(activation="gelu")  # type: ignore[arg-type]
