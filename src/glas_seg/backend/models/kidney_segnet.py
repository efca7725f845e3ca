"""Kidney-SegNet (Aatresh et al., "Efficient deep learning architecture with dimension-wise
pyramid pooling for nuclei segmentation of histopathology images", Computerized Medical
Imaging and Graphics, 2021) with a contour-aware head.

An encoder-decoder whose convolutions are DiCE units (Mehta et al., "DiCENet: dimension-wise
convolutions for efficient networks", IEEE TPAMI), with a DiCE-based atrous spatial pyramid
pooling (ASPP) module on the encoder output and attention gates (Oktay et al., "Attention
U-Net", MIDL 2018) on the skip connections. The layer plan follows the authors' code
(github.com/Aaatresh/kidney-segnet): a plain 3x3 convolution then a DiCE unit at full
resolution, two DiCE units on each of three pooled levels (channels ``width * 2**i``), ASPP
with a 1x1 branch, three dilated branches (rates 4, 6, 8) and a global-average branch, and
two DiCE units per decoder level. Each DiCE unit is followed by normalisation and ReLU.

DiCE unit (as in the DiCENet code the authors use): three dimension-wise convolutions --
channel-wise (depth-wise kxk), height-wise and width-wise -- whose outputs are concatenated,
normalised (PReLU), channel-shuffled and fused per channel by a grouped 1x1 convolution
(dimension-wise fusion); a grouped kxk projection to the output channels is multiplied by
squeeze-and-excitation style channel weights.

Choices the paper leaves open or that differ from it, and why:

* **Size-agnostic dimension-wise convolutions.** The original width-wise convolution gives
  every *column* its own kxk kernel over the (channel, height) plane (and the height-wise one
  every row a kernel over (channel, width)), so the layer is built for one input size;
  the reference code resamples other sizes to it and back. Here the width-wise convolution
  gives every *channel* its own kxk kernel over the (channel, height) plane -- it reads the
  channels ``c - d, c, c + d`` (zero beyond the ends) and ``k`` rows -- and slides it along
  the width; the height-wise one likewise over (channel, width), sliding along the height.
  The operation still mixes neighbouring channels with one spatial axis, its parameters scale
  with the channel count instead of the image size, and any input size works without
  resampling (tiles, odd sizes). It is implemented as a grouped ``(k, 1)`` / ``(1, k)``
  convolution over the channel-shifted stack ``[x[c-d], x[c], x[c+d]]``.
* The ASPP global branch uses adaptive average pooling (the reference code pools with a
  kernel of the fixed 64x64 feature size); branch width = the encoder's last channel count.
* Attention gates as in Oktay et al.: ``alpha = sigmoid(psi(relu(W_x x + up(W_g g))))`` with
  ``W_g`` applied at the coarse resolution and upsampled bilinearly (the reference code uses a
  transposed convolution, which fixes sizes to even multiples). The gated skip is
  concatenated with the upsampled decoder features (the reference code concatenates it with
  the ungated skip and lets the decoder influence the output only through the gate; we keep
  Oktay's decoder so deep features reach the head). Decoder features are upsampled
  bilinearly after a 1x1 convolution.
* The two concatenated sources are interleaved channel by channel, because a DiCE unit mixes
  channels only locally (neighbouring channels, grouped projection): with plain
  concatenation gated skip and decoder features would hardly meet.
* Padded convolutions, ceil-mode pooling and bilinear upsampling to the skip's exact size,
  so the output has the input's size for any size (total stride 8).
* The head predicts three classes -- background, interior, boundary -- as in DCAN
  (Chen et al., CVPR 2016), instead of the paper's distance-map regression, so the model
  shares training and watershed post-processing with the other architectures.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .unet import make_norm

__all__ = ["DiCE", "KidneySegNet", "kidney_segnet"]


def _norm_act(norm: str, channels: int, act: str = "prelu") -> nn.Sequential:
    return nn.Sequential(make_norm(norm, channels), nn.PReLU(channels) if act == "prelu" else nn.ReLU(inplace=True))


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate along channels as ``a0, b0, a1, b1, ...`` (same channel counts)."""
    return torch.stack([a, b], dim=2).flatten(1, 2)


class DiCE(nn.Module):
    """Dimension-wise convolution and fusion, size-agnostic variant (see the module docstring).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int
        Kernel side of the dimension-wise convolutions (odd; 1 or 3).
    dilation : int
        Dilation of the dimension-wise convolutions, spatially and across channels.
    norm : str
        Normalisation used inside the unit.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1,
                 norm: str = "batch") -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd")
        c, k, d = in_channels, kernel_size, dilation
        pad = k // 2 * d
        self.offsets = [i * d for i in range(k)]  # channel offsets into the zero-padded input
        self.channel_pad = k // 2 * d
        self.conv_channel = nn.Conv2d(c, c, k, padding=pad, dilation=d, groups=c, bias=False)
        self.conv_width = nn.Conv2d(k * c, c, (k, 1), padding=(pad, 0), dilation=(d, 1), groups=c, bias=False)
        self.conv_height = nn.Conv2d(k * c, c, (1, k), padding=(0, pad), dilation=(1, d), groups=c, bias=False)
        self.dim_act = _norm_act(norm, 3 * c)
        self.fuse = nn.Sequential(nn.Conv2d(3 * c, c, 1, groups=c, bias=False), _norm_act(norm, c))
        self.project = nn.Sequential(
            nn.Conv2d(c, out_channels, 3, padding=1, groups=math.gcd(c, out_channels), bias=False),
            _norm_act(norm, out_channels),
        )
        self.channel_weights = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(c, max(1, c // 4), 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(max(1, c // 4), out_channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def _channel_stack(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, k*C, H, W)``: for each channel ``c`` the channels ``c - d, c, c + d`` (zero-padded)."""
        if self.channel_pad == 0:
            return x
        c = x.shape[1]
        padded = F.pad(x, (0, 0, 0, 0, self.channel_pad, self.channel_pad))
        return torch.stack([padded[:, o : o + c] for o in self.offsets], dim=2).flatten(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stack = self._channel_stack(x)
        # Concatenate and channel-shuffle in one copy: channel c's three dimension-wise
        # responses end up adjacent, as the grouped fusion convolution expects.
        dims = torch.stack([self.conv_channel(x), self.conv_height(stack), self.conv_width(stack)], dim=2)
        fused = self.fuse(self.dim_act(dims.flatten(1, 2)))
        return self.project(fused) * self.channel_weights(fused)


class DiCEBlock(nn.Sequential):
    """Two DiCE units, each followed by normalisation and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__(
            DiCE(in_channels, out_channels, norm=norm), _norm_act(norm, out_channels, "relu"),
            DiCE(out_channels, out_channels, norm=norm), _norm_act(norm, out_channels, "relu"),
        )


class DiCEASPP(nn.Module):
    """Atrous spatial pyramid pooling with DiCE branches and a global-average branch."""

    def __init__(self, channels: int, branch_channels: int, rates: Sequence[int], norm: str) -> None:
        super().__init__()
        self.branches = nn.ModuleList([DiCE(channels, branch_channels, kernel_size=1, norm=norm)])
        self.branches.extend(DiCE(channels, branch_channels, 3, int(r), norm) for r in rates)
        self.merge = nn.Conv2d(branch_channels * len(self.branches) + channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 1).expand_as(x)
        return self.merge(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al.): scales skip features by a learned [0, 1] map."""

    def __init__(self, skip_channels: int, gate_channels: int, mid_channels: int) -> None:
        super().__init__()
        self.theta = nn.Conv2d(skip_channels, mid_channels, 1, bias=False)
        self.phi = nn.Conv2d(gate_channels, mid_channels, 1)
        self.psi = nn.Conv2d(mid_channels, 1, 1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        g = F.interpolate(self.phi(gate), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(self.theta(skip) + g)))
        return skip * alpha


class Up(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, norm: str) -> None:
        super().__init__()
        self.gate = AttentionGate(skip_channels, in_channels, skip_channels)
        self.reduce = nn.Conv2d(in_channels, skip_channels, 1)
        self.block = DiCEBlock(2 * skip_channels, skip_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.reduce(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(_interleave(self.gate(skip, x), up))


class KidneySegNet(nn.Module):
    """DiCE encoder-decoder with DiCE-ASPP and attention gates; see :func:`kidney_segnet`."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 3,
        width: int = 12,
        depth: int = 3,
        aspp_rates: Sequence[int] = (4, 6, 8),
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be at least 1")
        channels = [width * 2**i for i in range(depth + 1)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=norm == "none"),
            _norm_act(norm, width, "relu"),
            DiCE(width, width, norm=norm),
            _norm_act(norm, width, "relu"),
        )
        self.encoder = nn.ModuleList(DiCEBlock(channels[i], channels[i + 1], norm) for i in range(depth))
        self.aspp = DiCEASPP(channels[-1], channels[-1], aspp_rates, norm)
        self.decoder = nn.ModuleList(Up(channels[i + 1], channels[i], norm) for i in reversed(range(depth)))
        self.head = nn.Conv2d(width, num_classes, 1)
        self.size_multiple = 2**depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = [x]
        for block in self.encoder:
            x = block(F.max_pool2d(x, 2, ceil_mode=True))
            skips.append(x)
        x = self.aspp(skips.pop())
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(x)


def kidney_segnet(
    in_channels: int = 3,
    num_classes: int = 3,
    width: int = 12,
    depth: int = 3,
    aspp_rates: Sequence[int] = (4, 6, 8),
    norm: str = "batch",
) -> KidneySegNet:
    """Build a Kidney-SegNet.

    Parameters
    ----------
    in_channels : int
        Image channels (3 for RGB).
    num_classes : int
        Output channels; 3 for background / interior / boundary.
    width : int
        Channels at full resolution; each level down doubles them.
    depth : int
        Number of 2x poolings (the paper uses 3); the ASPP runs at ``1 / 2**depth``.
    aspp_rates : sequence of int
        Dilation rates of the ASPP's dilated DiCE branches (the paper uses 4, 6, 8).
    norm : {"batch", "instance", "group", "none"}
        Normalisation inside and after each DiCE unit.

    Returns
    -------
    KidneySegNet
        Maps ``(N, in_channels, H, W)`` float tensors to ``(N, num_classes, H, W)`` logits,
        for any ``H`` and ``W``.
    """
    return KidneySegNet(in_channels, num_classes, width, depth, tuple(int(r) for r in aspp_rates), norm)
