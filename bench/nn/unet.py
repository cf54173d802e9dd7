"""One configurable U-Net, shared by the defenses that learn an image-to-image map.

REFINE's input transformation and BTI-DBF's trigger generator / purifier are both U-Nets: an
encoder of (two 3x3 convolutions -> norm -> activation) blocks separated by 2x2 max-pooling, a
decoder that upsamples, concatenates the skip connection of the same resolution and applies
another such block, and a 1x1 output convolution whose raw output the callers use. They differ
in widths, in how the decoder upsamples and sizes its blocks, and in norm and activation -- all
constructor arguments here, with one preset per public implementation:

- :func:`refine_unet` -- the REFINE code's ``UNetLittle`` (after milesial's Pytorch-UNet with
  bilinear upsampling): encoder widths ``c, 2c, 4c, 8c`` and an ``8c`` bottleneck; bilinear
  upsampling with ``align_corners=True`` (no weights); decoder blocks whose first convolution
  halves their input width (``16c -> 8c -> 4c``, ``8c -> 4c -> 2c``, ``4c -> 2c -> c``,
  ``2c -> c -> c``); batch norm and ReLU. 17,267,523 parameters at c = 64 on RGB images.
- :func:`btidbf_unet` -- the BTI-DBF code's generator (``UNet(base_filter_num=32,
  num_blocks=4)``): encoder widths ``b, 2b, 4b, 8b`` (capped at 512) and a bottleneck of twice
  the last (512 at b = 32); each decoder level upsamples with a 3x3 stride-2 transposed
  convolution (+ activation) that keeps the width and lands on the skip's width; instance norm
  (affine) and leaky ReLU with slope 0.01. 10,987,011 parameters at b = 32 on RGB images: the
  reference module holds 14,121,411, of which 3,134,400 belong to an interpolation branch of its
  decoder blocks that its forward pass never uses (so they are not built here).

Every convolution has a bias, as in both references (also before a norm, where it is redundant),
so the parameter counts match theirs.

Any input size works: the input is replicate-padded up to a multiple of ``2**depth`` and the
output cropped back, so 28-px MNIST never reaches a 1x1 map (where instance norm is undefined)
and every upsampling is an exact 2x.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Literal["batch", "instance", "none"]
Activation = Literal["relu", "leaky_relu"]
Upsample = Literal["bilinear", "transposed"]
DecoderMid = Literal["output", "half_input"]

_NORMS = ("batch", "instance", "none")
_ACTIVATIONS = ("relu", "leaky_relu")
_UPSAMPLES = ("bilinear", "transposed")
_MIDS = ("output", "half_input")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


def _activation(kind: str, negative_slope: float) -> nn.Module:
    return nn.LeakyReLU(negative_slope, inplace=True) if kind == "leaky_relu" else nn.ReLU(inplace=True)


class ConvBlock(nn.Sequential):
    """Two (3x3 conv -> norm -> activation) layers, ``cin -> mid -> cout`` (``mid`` defaults to ``cout``)."""

    def __init__(self, cin: int, cout: int, norm: str, activation: str, negative_slope: float,
                 mid: int | None = None) -> None:  # fmt: skip
        mid = cout if mid is None else mid
        super().__init__(
            nn.Conv2d(cin, mid, 3, padding=1), _norm(norm, mid), _activation(activation, negative_slope),
            nn.Conv2d(mid, cout, 3, padding=1), _norm(norm, cout), _activation(activation, negative_slope),
        )  # fmt: skip


class UpLevel(nn.Module):
    """One decoder level: upsample the deeper map 2x, concatenate ``[skip, upsampled]``, a ConvBlock."""

    def __init__(self, cin: int, skip: int, cout: int, mid: int, upsample: str, norm: str, activation: str,
                 negative_slope: float) -> None:  # fmt: skip
        super().__init__()
        self.up: nn.Module | None = None
        if upsample == "transposed":
            self.up = nn.Sequential(nn.ConvTranspose2d(cin, cin, 3, stride=2, padding=1, output_padding=1),
                                    _activation(activation, negative_slope))  # fmt: skip
        self.block = ConvBlock(cin + skip, cout, norm, activation, negative_slope, mid)

    def forward(self, z: Tensor, skip: Tensor) -> Tensor:
        if self.up is None:
            z = F.interpolate(z, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        else:
            z = self.up(z)
        return self.block(torch.cat([skip, z], dim=1))


class UNet(nn.Module):
    """Encoder-decoder with skip connections (see the module docstring and its two presets).

    Args:
        in_channels / out_channels: image channels in and out.
        encoder: widths of the stem and of each down level; the last is the bottleneck, so
            ``len(encoder) - 1`` is the depth (the number of 2x poolings).
        decoder: output width of each up level, deepest first (``len(encoder) - 1`` of them).
        upsample: ``bilinear`` (``align_corners=True``, no weights) or ``transposed`` (a 3x3
            stride-2 transposed convolution keeping the width, then the activation).
        decoder_mid: width between a decoder block's two convolutions: ``output`` (its output
            width) or ``half_input`` (half of its concatenated input width).
        norm: ``batch``, ``instance`` (affine) or ``none``.
        activation: ``relu`` or ``leaky_relu`` (with ``negative_slope``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        encoder: Sequence[int],
        decoder: Sequence[int],
        upsample: Upsample = "bilinear",
        decoder_mid: DecoderMid = "output",
        norm: Norm = "batch",
        activation: Activation = "relu",
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        for name, value, allowed in (("norm", norm, _NORMS), ("activation", activation, _ACTIVATIONS),
                                     ("upsample", upsample, _UPSAMPLES), ("decoder_mid", decoder_mid, _MIDS)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"unet {name} must be one of {allowed}, got {value!r}")
        encoder, decoder = list(encoder), list(decoder)
        if len(encoder) < 2 or len(decoder) != len(encoder) - 1 or min(encoder + decoder) < 1:
            raise ValueError(f"unet needs >= 2 positive encoder widths and one positive decoder width per down "
                             f"level, got encoder={encoder}, decoder={decoder}")  # fmt: skip
        self.depth = len(decoder)

        def block(cin: int, cout: int) -> ConvBlock:
            return ConvBlock(cin, cout, norm, activation, negative_slope)

        self.stem = block(in_channels, encoder[0])
        self.down = nn.ModuleList(block(cin, cout) for cin, cout in zip(encoder[:-1], encoder[1:]))
        self.up = nn.ModuleList()
        cin = encoder[-1]
        for skip, cout in zip(reversed(encoder[:-1]), decoder):
            mid = (cin + skip) // 2 if decoder_mid == "half_input" else cout
            self.up.append(UpLevel(cin, skip, cout, mid, upsample, norm, activation, negative_slope))
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
            z = up(z, skip)
        return self.out(z)[..., :h, :w]


def refine_unet(channels: int, base: int) -> UNet:
    """REFINE's input transformation: the public code's ``UNetLittle`` with first width ``base`` (c)."""
    c = base
    return UNet(channels, channels, encoder=[c, 2 * c, 4 * c, 8 * c, 8 * c], decoder=[4 * c, 2 * c, c, c],
                upsample="bilinear", decoder_mid="half_input", norm="batch", activation="relu")  # fmt: skip


def btidbf_unet(channels: int, base: int = 32, depth: int = 4, norm: Norm = "instance") -> UNet:
    """BTI-DBF's generator and purifier: the public code's U-Net with ``base`` filters and ``depth`` blocks."""
    widths = [min(base * 2**i, 512) for i in range(depth)]
    return UNet(channels, channels, encoder=[*widths, 2 * widths[-1]], decoder=widths[::-1], upsample="transposed",
                decoder_mid="output", norm=norm, activation="leaky_relu", negative_slope=0.01)  # fmt: skip
