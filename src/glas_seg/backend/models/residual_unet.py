"""Recurrent residual U-Net, R2U-Net style (Alom, Hasan, Yakopcic, Taha & Asari, arXiv:1802.06955, 2018),
with a contour-aware head.

Every U-Net double convolution is replaced by a recurrent residual block: a 1x1 convolution
adapts the channels, two recurrent convolutional layers (RCL) follow, and their output is
added to the block's input. An RCL unrolls ``t`` steps of

    h_0 = act(norm_0(conv_f(x)))
    h_s = act(norm_s(conv_f(x) + conv_r(h_{s-1})))      for s = 1 .. t

with the same feed-forward (``conv_f``) and recurrent (``conv_r``) weights at every step, so
depth of processing grows with ``t`` while the parameter count does not.

Choices the paper leaves open or that differ from it, and why:

* Separate feed-forward and recurrent 3x3 kernels, as in the paper's equation (Liang & Hu's
  RCNN); ``conv_f(x)`` is computed once per RCL and reused at every step. (Popular
  re-implementations share one kernel for both; that halves the parameters but is not the
  paper's formulation.)
* ``t = 2`` recurrent steps by default, as in the paper's experiments, i.e. three 3x3
  convolutions per RCL and six per block.
* One normalisation layer per time step (batch norm by default): the statistics of ``h_0``
  and ``h_2`` differ, so sharing them would hurt; the paper predates this detail.
* The residual connection adds the 1x1-adapted input to the output of the second RCL,
  without an activation after the sum.
* Padded convolutions, bilinear upsampling followed by a 3x3 convolution, ceil-mode pooling
  and channels ``width * 2**i`` as in our :mod:`.unet`. The default width (12) gives about the
  default U-Net's parameter count, the comparison the paper makes; each block costs about
  three U-Net blocks of the same width.
* The head predicts three classes -- background, interior, boundary -- as in DCAN
  (Chen et al., CVPR 2016), for watershed splitting of touching objects.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from .unet import UNet, make_norm

__all__ = ["RecurrentConv", "RecurrentResidualBlock", "ResidualUNet", "residual_unet"]


class RecurrentConv(nn.Module):
    """Recurrent convolutional layer: ``t`` steps sharing one feed-forward and one recurrent kernel."""

    def __init__(self, channels: int, t: int, norm: str) -> None:
        super().__init__()
        if t < 1:
            raise ValueError("t must be at least 1")
        bias = norm == "none"
        self.t = t
        self.forward_conv = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.recurrent_conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norms = nn.ModuleList(make_norm(norm, channels) for _ in range(t + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = self.forward_conv(x)
        h = F.relu(self.norms[0](feed))
        for step in range(1, self.t + 1):
            h = F.relu(self.norms[step](feed + self.recurrent_conv(h)))
        return h


class RecurrentResidualBlock(nn.Module):
    """1x1 channel adapter, two recurrent convolutional layers, residual sum."""

    def __init__(self, in_channels: int, out_channels: int, t: int, norm: str) -> None:
        super().__init__()
        self.adapt = nn.Conv2d(in_channels, out_channels, 1)
        self.body = nn.Sequential(RecurrentConv(out_channels, t, norm), RecurrentConv(out_channels, t, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adapt(x)
        return x + self.body(x)


class ResidualUNet(UNet):
    """U-Net of recurrent residual blocks; see :func:`residual_unet` for the parameters."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 3,
        width: int = 12,
        depth: int = 4,
        t: int = 2,
        norm: str = "batch",
    ) -> None:
        super().__init__(in_channels, num_classes, width, depth, norm,
                         block=partial(RecurrentResidualBlock, t=t, norm=norm))


def residual_unet(
    in_channels: int = 3,
    num_classes: int = 3,
    width: int = 12,
    depth: int = 4,
    t: int = 2,
    norm: str = "batch",
) -> ResidualUNet:
    """Build a recurrent residual U-Net (R2U-Net).

    Parameters
    ----------
    in_channels : int
        Image channels (3 for RGB).
    num_classes : int
        Output channels; 3 for background / interior / boundary.
    width : int
        Channels of the first level; each level down doubles them.
    depth : int
        Number of 2x poolings (the paper uses 4).
    t : int
        Recurrent steps per recurrent convolutional layer (the paper uses 2). Weights are
        shared across steps, so ``t`` changes compute, not parameters.
    norm : {"batch", "instance", "group", "none"}
        Normalisation after each convolution step.

    Returns
    -------
    ResidualUNet
        Maps ``(N, in_channels, H, W)`` float tensors to ``(N, num_classes, H, W)`` logits,
        for any ``H`` and ``W``.
    """
    return ResidualUNet(in_channels, num_classes, width, depth, t, norm)
