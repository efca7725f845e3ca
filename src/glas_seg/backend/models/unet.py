"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015) with a contour-aware head.

Choices the paper leaves open or that differ from it, and why:

* Padded 3x3 convolutions, so the output has the input's size and tiles can be blended
  without the paper's overlap-tile cropping.
* A normalisation layer after every convolution (batch norm by default): the paper predates
  it, and it makes training from scratch on 85 images stable.
* Bilinear upsampling followed by a 3x3 convolution instead of transposed convolutions,
  which avoids checkerboard artefacts at tile seams.
* The head predicts three classes -- background, gland interior, gland boundary -- as in
  DCAN (Chen et al., CVPR 2016), so that touching glands can be split by a watershed seeded
  from the interiors.
"""

from __future__ import annotations

import math

from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["UNet", "unet", "make_norm"]


def make_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer by name: ``"batch"``, ``"instance"``, ``"group"`` or ``"none"``.

    Group norm uses ``min(8, channels)`` groups, or ``gcd(8, channels)`` where that would not
    divide the channel count, so every channel count works.
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "group":
        groups = min(8, channels)
        if channels % groups:  # e.g. 12 or 36 channels: 4 groups
            groups = math.gcd(8, channels)
        return nn.GroupNorm(groups, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"Unknown normalisation {norm!r}; use batch, instance, group or none")


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


Block = Callable[[int, int], nn.Module]  # (in_channels, out_channels) -> module keeping H and W


class Up(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, block: Block) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, skip_channels, 3, padding=1)
        self.conv = block(2 * skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, self.reduce(x)], dim=1))


class UNet(nn.Module):
    """Encoder-decoder with skip connections; see :func:`unet` for the parameters.

    ``block(in_channels, out_channels)`` builds each level's convolution block (a
    :class:`DoubleConv` by default); other U-Net variants pass their own.
    """

    def __init__(
        self, in_channels: int = 3, num_classes: int = 3, width: int = 16, depth: int = 4, norm: str = "batch",
        block: Block | None = None,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be at least 1")
        block = block or partial(DoubleConv, norm=norm)
        channels = [width * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList([block(in_channels, channels[0])])
        self.encoder.extend(block(channels[i], channels[i + 1]) for i in range(depth))
        self.decoder = nn.ModuleList(
            Up(channels[i + 1], channels[i], channels[i], block) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(channels[0], num_classes, 1)
        self.size_multiple = 2**depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2, ceil_mode=True))
            skips.append(x)
        x = skips.pop()
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(x)


def unet(in_channels: int = 3, num_classes: int = 3, width: int = 16, depth: int = 4, norm: str = "batch") -> UNet:
    """Build a U-Net.

    Parameters
    ----------
    in_channels : int
        Image channels (3 for RGB).
    num_classes : int
        Output channels; 3 for background / interior / boundary.
    width : int
        Channels of the first level; each level down doubles them (the paper uses 64).
    depth : int
        Number of 2x poolings (the paper uses 4).
    norm : {"batch", "instance", "group", "none"}
        Normalisation after each convolution.

    Returns
    -------
    UNet
        Maps ``(N, in_channels, H, W)`` float tensors to ``(N, num_classes, H, W)`` logits,
        for any ``H`` and ``W``.
    """
    return UNet(in_channels, num_classes, width, depth, norm)
