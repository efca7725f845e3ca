"""Micro-Net (Raza et al., "Micro-Net: A unified model for segmentation of various objects in
microscopy images", Medical Image Analysis 52, 2019) with a contour-aware head.

Layer plan of the paper's Micro-Net-508 (filter counts as multiples of ``width``; the paper's
``width`` is 64):

* Four *group 1* encoder blocks. Block ``k`` (``f = width * 2**(k-1)`` filters) runs two 3x3
  convolutions and a 2x2 max-pooling on the previous block's output, and in parallel two 3x3
  convolutions on the *input image resized* to the pooled resolution; the two are
  concatenated (``2f`` channels). This re-injects the raw image at every scale -- the paper's
  multi-resolution input branches.
* A *group 2* bridge: two 3x3 convolutions to ``32 * width`` channels.
* Four *group 3* decoder blocks: a 2x2 stride-2 transposed convolution and two 3x3
  convolutions on the main path, 5x5 convolutions on the main path and on the matching group-1
  output (skip), concatenation and a 1x1 fusion convolution.
* Three *group 4* branches upsample the last three decoder outputs to the input's resolution
  (transposed convolutions with stride 2, 4, 8, then a 3x3 convolution; ``width``,
  ``2 * width`` and ``4 * width`` channels). Each feeds an auxiliary output (dropout, 3x3
  convolution); their concatenation feeds the main output the same way.

Choices the paper leaves open or that differ from it, and why:

* **Size-agnostic: padded convolutions.** The paper's valid convolutions map 508x508 to a
  smaller output, and its 5x5 stride-1 *transposed* convolutions exist only to re-grow the
  borders they ate so that skip and main path line up. Here every convolution is padded, so
  the output has the input's size for any input size (tiles, odd sizes, not only 508); those
  5x5 layers become plain padded 5x5 convolutions (a stride-1 transposed convolution is a
  convolution). Without shrinking borders, the group-3 2x upsampling would land the bridge
  on the wrong grid, so a 2x2 max-pooling precedes the bridge (bridge at 1/32, each
  decoder block back on its skip's grid); the total stride is therefore 32. Upsampled maps
  are cropped to the skip's (or the input's) size, which handles odd sizes with ceil-mode
  pooling.
* The image is resized for the multi-resolution branches with antialiased bilinear
  interpolation (the paper: bicubic).
* tanh activations as in the paper (``activation="relu"`` is available), but a normalisation
  layer after *every* convolution (the paper normalises only the first convolution of each
  group-1 branch), for stable training from scratch.
* Dropout 0.5 before every output convolution, as in the paper.
* Auxiliary losses: training mode returns ``{"out": main, "aux": [aux1, aux2, aux3]}`` and the
  shared :func:`~glas_seg.backend.training.training_loss` adds their mean with a fixed
  weight; the paper's per-epoch decay of the auxiliary weights is not reproduced.
* **Memory.** The paper's full-width network is very large (2048 bridge channels), and a
  published re-implementation could not train it in 27 GB. The default ``width`` is 8 instead
  of 64, and ``checkpointing=True`` wraps each group block, each full-resolution upsampler
  and each output head in :func:`torch.utils.checkpoint.checkpoint`, so that a training step
  keeps only block boundaries in memory and recomputes the rest during the backward pass,
  one block at a time (about one extra forward pass of compute). Batch-norm running statistics are updated again on recompute,
  which only changes their effective momentum; gradients are exact. Mixed precision is
  applied by the shared training loop (CUDA autocast); see ``docs/benchmarks.md`` for
  measured CPU memory.
* The head predicts three classes -- background, interior, boundary -- as in DCAN
  (Chen et al., CVPR 2016), for watershed splitting of touching objects.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .unet import make_norm

__all__ = ["MicroNet", "micronet"]


def _act(activation: str) -> nn.Module:
    if activation == "tanh":
        return nn.Tanh()
    if activation == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"Unknown activation {activation!r}; use tanh or relu")


def _conv(in_channels: int, out_channels: int, kernel: int, norm: str, activation: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=norm == "none"),
        make_norm(norm, out_channels),
        _act(activation),
    )


def _crop(x: torch.Tensor, size) -> torch.Tensor:
    return x[..., : size[0], : size[1]]


class Group1(nn.Module):
    """Encoder block: two convolutions and pooling, concatenated with the resized image's branch."""

    def __init__(self, in_channels: int, image_channels: int, filters: int, norm: str, activation: str) -> None:
        super().__init__()
        self.main = nn.Sequential(_conv(in_channels, filters, 3, norm, activation), _conv(filters, filters, 3, norm, activation))
        self.image = nn.Sequential(_conv(image_channels, filters, 3, norm, activation), _conv(filters, filters, 3, norm, activation))

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.main(x), 2, ceil_mode=True)
        return torch.cat([x, self.image(image)], dim=1)


class Group3(nn.Module):
    """Decoder block: upsample and convolve the main path, fuse with the skip."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str, activation: str) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.convs = nn.Sequential(_conv(out_channels, out_channels, 3, norm, activation),
                                   _conv(out_channels, out_channels, 3, norm, activation))
        self.main5 = _conv(out_channels, out_channels, 5, norm, activation)
        self.skip5 = _conv(skip_channels, out_channels, 5, norm, activation)
        self.fuse = _conv(2 * out_channels, out_channels, 1, norm, activation)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.convs(_crop(self.up(x), skip.shape[-2:]))
        return self.fuse(torch.cat([self.main5(x), self.skip5(skip)], dim=1))


class Group4(nn.Sequential):
    """Upsample a decoder output to the input's resolution (transposed convolution, 3x3 convolution)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int, norm: str, activation: str) -> None:
        super().__init__(nn.ConvTranspose2d(in_channels, out_channels, factor, stride=factor),
                         _conv(out_channels, out_channels, 3, norm, activation))
        self.factor = factor


class MicroNet(nn.Module):
    """Multi-resolution encoder-decoder with auxiliary outputs; see :func:`micronet` for the parameters."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 3,
        width: int = 8,
        norm: str = "batch",
        activation: str = "tanh",
        dropout: float = 0.5,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        w = width
        self.encoder = nn.ModuleList([
            Group1(in_channels, in_channels, w, norm, activation),
            Group1(2 * w, in_channels, 2 * w, norm, activation),
            Group1(4 * w, in_channels, 4 * w, norm, activation),
            Group1(8 * w, in_channels, 8 * w, norm, activation),
        ])
        self.bridge = nn.Sequential(_conv(16 * w, 32 * w, 3, norm, activation), _conv(32 * w, 32 * w, 3, norm, activation))
        self.decoder = nn.ModuleList([
            Group3(32 * w, 16 * w, 16 * w, norm, activation),
            Group3(16 * w, 8 * w, 8 * w, norm, activation),
            Group3(8 * w, 4 * w, 4 * w, norm, activation),
            Group3(4 * w, 2 * w, 2 * w, norm, activation),
        ])
        # From the last decoder block (1/2 resolution) up: factors 2, 4, 8.
        self.upsamplers = nn.ModuleList([
            Group4(2 * w, w, 2, norm, activation),
            Group4(4 * w, 2 * w, 4, norm, activation),
            Group4(8 * w, 4 * w, 8, norm, activation),
        ])
        self.aux_heads = nn.ModuleList(
            nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(c, num_classes, 3, padding=1)) for c in (w, 2 * w, 4 * w)
        )
        self.head = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(7 * w, num_classes, 3, padding=1))
        self.checkpointing = checkpointing
        self.size_multiple = 32

    def _run(self, fn, *args):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        skips = []
        feats = x
        for level, block in enumerate(self.encoder, start=1):
            pooled = [-(-s // 2**level) for s in size]
            image = F.interpolate(x, size=pooled, mode="bilinear", align_corners=False, antialias=True)
            feats = self._run(block, feats, image)
            skips.append(feats)
        feats = self._run(self.bridge, F.max_pool2d(feats, 2, ceil_mode=True))
        decoded = []
        for block in self.decoder:
            feats = self._run(block, feats, skips.pop())
            decoded.append(feats)
        _, b7, b8, b9 = decoded
        # Full-resolution maps dominate memory: one checkpoint segment per upsampler and head,
        # so that the backward pass recomputes one of them at a time.
        maps = [_crop(self._run(up, b), size) for up, b in zip(self.upsamplers, (b9, b8, b7))]
        aux = [self._run(head, m) for head, m in zip(self.aux_heads, maps)]
        out = self._run(lambda *m: self.head(torch.cat(m, dim=1)), *maps)
        if self.training:
            return {"out": out, "aux": aux}
        return out


def micronet(
    in_channels: int = 3,
    num_classes: int = 3,
    width: int = 8,
    norm: str = "batch",
    activation: str = "tanh",
    dropout: float = 0.5,
    checkpointing: bool = False,
) -> MicroNet:
    """Build a Micro-Net.

    Parameters
    ----------
    in_channels : int
        Image channels (3 for RGB).
    num_classes : int
        Output channels; 3 for background / interior / boundary.
    width : int
        Filters of the first encoder block; the bridge has ``32 * width`` (the paper uses 64).
    norm : {"batch", "instance", "group", "none"}
        Normalisation after each convolution.
    activation : {"tanh", "relu"}
        Activation after each convolution (the paper uses tanh).
    dropout : float
        Dropout probability before the output convolutions (the paper uses 0.5).
    checkpointing : bool
        Recompute activations in the backward pass instead of storing them (less memory, about
        one extra forward pass of compute). Only affects training; may also be switched on a
        built network through its ``checkpointing`` attribute.

    Returns
    -------
    MicroNet
        In eval mode maps ``(N, in_channels, H, W)`` float tensors to ``(N, num_classes, H, W)``
        logits for any ``H`` and ``W``; in training mode returns ``{"out": logits, "aux": [...]}``
        with three auxiliary logits of the same size.
    """
    return MicroNet(in_channels, num_classes, width, norm, activation, dropout, checkpointing)
