"""One configurable U-Net, shared by the defenses that learn an image-to-image map.

REFINE's input transformation and BTI-DBF's trigger generator / purifier are both U-Nets that
differ only in width, normalisation and activation, so they share this module instead of each
carrying its own copy. Both use the raw output of the last 1x1 convolution (their callers clamp
it to the pixel range).

Shape: ``depth`` down levels and ``depth`` up levels. With base width ``c`` and the default
``depth=4`` the encoder widths are ``c, 2c, 4c, 8c`` and the bottleneck is ``8c`` (the widths
``c, 2c, 4c, 8c, 8c`` of the bilinear U-Net). Each decoder level upsamples bilinearly (no
transposed convolution), concatenates the skip connection of the same resolution and applies
two 3x3 convolutions, halving the width back down to ``c``; a 1x1 convolution maps to the
output channels.

Any input size works: the input is replicate-padded up to a multiple of ``2**depth`` and the
output cropped back, so 28-px MNIST never reaches a 1x1 map (where instance norm is undefined).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Literal["batch", "instance", "none"]
Activation = Literal["relu", "leaky_relu"]

_NORMS = ("batch", "instance", "none")
_ACTIVATIONS = ("relu", "leaky_relu")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


def _activation(kind: str, negative_slope: float) -> nn.Module:
    return nn.LeakyReLU(negative_slope, inplace=True) if kind == "leaky_relu" else nn.ReLU(inplace=True)


class ConvBlock(nn.Sequential):
    """Two (3x3 conv -> norm -> activation) layers; the conv has no bias when a norm follows."""

    def __init__(self, cin: int, cout: int, norm: str, activation: str, negative_slope: float) -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=bias), _norm(norm, cout), _activation(activation, negative_slope),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias), _norm(norm, cout), _activation(activation, negative_slope),
        )  # fmt: skip


class UNet(nn.Module):
    """Encoder-decoder with skip connections and bilinear upsampling (see the module docstring).

    Args:
        in_channels / out_channels: image channels in and out.
        base: width ``c`` of the first level.
        depth: number of down (and up) levels; widths are ``c * 2**i`` capped at ``c * 2**(depth-1)``.
        norm: ``batch``, ``instance`` (affine) or ``none``.
        activation: ``relu`` or ``leaky_relu`` (with ``negative_slope``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        base: int = 64,
        depth: int = 4,
        norm: Norm = "batch",
        activation: Activation = "relu",
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"unet norm must be one of {_NORMS}, got {norm!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unet activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if base < 1 or depth < 1:
            raise ValueError(f"unet base and depth must be >= 1, got base={base}, depth={depth}")
        self.depth = depth

        def block(cin: int, cout: int) -> ConvBlock:
            return ConvBlock(cin, cout, norm, activation, negative_slope)

        widths = [base * 2**i for i in range(depth)]  # c, 2c, 4c, 8c for depth 4
        self.stem = block(in_channels, widths[0])
        # Down level i halves the resolution; the last one keeps the width (the 8c bottleneck).
        downs = [widths[i + 1] for i in range(depth - 1)] + [widths[-1]]
        self.down = nn.ModuleList()
        cin = widths[0]
        for cout in downs:
            self.down.append(block(cin, cout))
            cin = cout
        # Up level j concatenates the skip of width widths[-1-j] and lands on the next width down.
        self.up = nn.ModuleList()
        for j in range(depth):
            skip = widths[depth - 1 - j]
            cout = widths[depth - 2 - j] if j < depth - 1 else widths[0]
            self.up.append(block(cin + skip, cout))
            cin = cout
        self.out = nn.Conv2d(cin, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        multiple = 2**self.depth
        pad_h, pad_w = (-h) % multiple, (-w) % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        z = self.stem(x)
        for down in self.down:
            skips.append(z)
            z = down(F.max_pool2d(z, 2))
        for up, skip in zip(self.up, reversed(skips), strict=True):
            z = F.interpolate(z, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            z = up(torch.cat([skip, z], dim=1))
        return self.out(z)[..., :h, :w]
