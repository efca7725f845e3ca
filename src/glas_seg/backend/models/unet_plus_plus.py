"""U-Net++ (Zhou, Rahman Siddiquee, Tajbakhsh & Liang, DLMIA 2018) with a contour-aware head.

Nested, dense skip pathways: node ``X[i][j]`` (level ``i`` down, ``j`` convolution blocks along
the skip pathway) sees every earlier node of its level, ``X[i][0..j-1]``, and the upsampled
``X[i+1][j-1]``. A 1x1 head on each top node ``X[0][1..depth]`` gives deep supervision.

Choices the paper leaves open or that differ from it, and why:

* Padded 3x3 convolutions (two per node, as the paper's ``H``), a normalisation layer after
  each (batch norm by default) and ReLU, as in our :mod:`.unet`: output size = input size,
  stable training from scratch on small data sets.
* Upsampling is bilinear (to the skip's exact size, so odd sizes work) without a learned
  convolution; the paper's Keras code uses transposed convolutions. The next node's
  convolutions mix the channels anyway, and this keeps the many upsampling steps free.
* Channels ``width * 2**i`` on level ``i`` (the paper uses 32, 64, 128, 256, 512).
* Accurate mode averages the heads' class *probabilities* and returns their logarithm as
  logits (``softmax(log p) = p``, so downstream softmax and argmax see the average). Fast mode
  returns the logits of the single head on ``X[0][prune_level]`` and computes only the nodes
  it depends on (``i + j <= prune_level``): the encoder stops at level ``prune_level``, so the
  network's :attr:`~UNetPlusPlus.size_multiple` drops to ``2**prune_level``.
* The mode is an inference setting (:meth:`UNetPlusPlus.set_mode`, also stored in the builder
  arguments) and changes no weight, so it can be toggled on a loaded model. Training always
  runs the full network: ``{"out": accurate-mode logits, "aux": [head_1, ..., head_depth]}``,
  so :func:`~glas_seg.backend.training.training_loss` scores the averaged prediction plus
  every head with equal weight (the paper weights all heads equally), and any pruned head is
  trained well enough to be used alone.
* The head predicts three classes -- background, interior, boundary -- as in DCAN
  (Chen et al., CVPR 2016), for watershed splitting of touching objects.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .unet import DoubleConv

__all__ = ["UNetPlusPlus", "unet_plus_plus", "MODES"]

MODES = ("accurate", "fast")  # keep in step with the registry entry in models/__init__.py


def _upsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class UNetPlusPlus(nn.Module):
    """Nested U-Net with deep supervision; see :func:`unet_plus_plus` for the parameters."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 3,
        width: int = 12,
        depth: int = 4,
        norm: str = "batch",
        mode: str = "accurate",
        prune_level: int = 3,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.depth = depth
        channels = [width * 2**i for i in range(depth + 1)]
        # nodes[i][j] is X[i][j]; nodes[i][0] are the encoder blocks.
        self.nodes = nn.ModuleList()
        for i in range(depth + 1):
            level = nn.ModuleList([DoubleConv(in_channels if i == 0 else channels[i - 1], channels[i], norm)])
            for j in range(1, depth - i + 1):
                level.append(DoubleConv(j * channels[i] + channels[i + 1], channels[i], norm))
            self.nodes.append(level)
        self.heads = nn.ModuleList(nn.Conv2d(channels[0], num_classes, 1) for _ in range(depth))
        self._mode = "accurate"
        self._prune_level = depth
        self.set_mode(mode, prune_level)

    # -- inference mode -------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """``"accurate"`` (average every head) or ``"fast"`` (one pruned head)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self.set_mode(value)

    @property
    def prune_level(self) -> int:
        """Level of the head fast mode uses (1 = shallowest and fastest, ``depth`` = deepest)."""
        return self._prune_level

    def set_mode(self, mode: str, prune_level: int | None = None) -> "UNetPlusPlus":
        """Switch the inference mode without touching the weights; returns ``self``."""
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}; use one of {', '.join(MODES)}")
        level = self._prune_level if prune_level is None else int(prune_level)
        if not 1 <= level <= self.depth:
            raise ValueError(f"prune_level must be between 1 and depth={self.depth}, got {level}")
        self._mode, self._prune_level = mode, level
        return self

    @property
    def size_multiple(self) -> int:
        """Total stride of the nodes the current mode computes."""
        if self._mode == "fast" and not self.training:
            return 2**self._prune_level
        return 2**self.depth

    # -- forward --------------------------------------------------------------------------
    def _top_nodes(self, x: torch.Tensor, levels: int) -> list[torch.Tensor]:
        """``X[0][1..levels]``, computing only the nodes with ``i + j <= levels``."""
        grid: list[list[torch.Tensor]] = []
        for i in range(levels + 1):
            x = self.nodes[i][0](x if i == 0 else F.max_pool2d(x, 2, ceil_mode=True))
            grid.append([x])
        # Anti-diagonals k = i + j: X[i][j] needs X[i][<j] (earlier diagonals) and X[i+1][j-1]
        # (same diagonal, one level down), so each diagonal runs bottom-up.
        for k in range(1, levels + 1):
            for i in reversed(range(k)):
                j = k - i
                inputs = grid[i][:j] + [_upsample(grid[i + 1][j - 1], grid[i][0])]
                grid[i].append(self.nodes[i][j](torch.cat(inputs, dim=1)))
        return grid[0][1:]

    @staticmethod
    def _average(logits: list[torch.Tensor]) -> torch.Tensor:
        """Log of the heads' mean class probabilities (usable as logits)."""
        log_probs = torch.stack([torch.log_softmax(z.float(), dim=1) for z in logits])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))

    def forward(self, x: torch.Tensor):
        if self.training:
            logits = [head(node) for head, node in zip(self.heads, self._top_nodes(x, self.depth))]
            return {"out": self._average(logits), "aux": logits}
        if self._mode == "fast":
            level = self._prune_level
            return self.heads[level - 1](self._top_nodes(x, level)[-1])
        logits = [head(node) for head, node in zip(self.heads, self._top_nodes(x, self.depth))]
        return self._average(logits).to(logits[0].dtype)


def unet_plus_plus(
    in_channels: int = 3,
    num_classes: int = 3,
    width: int = 12,
    depth: int = 4,
    norm: str = "batch",
    mode: str = "accurate",
    prune_level: int = 3,
) -> UNetPlusPlus:
    """Build a U-Net++.

    Parameters
    ----------
    in_channels : int
        Image channels (3 for RGB).
    num_classes : int
        Output channels; 3 for background / interior / boundary.
    width : int
        Channels of the first level; each level down doubles them (the paper uses 32).
    depth : int
        Number of 2x poolings, and of deep-supervision heads (the paper uses 4).
    norm : {"batch", "instance", "group", "none"}
        Normalisation after each convolution.
    mode : {"accurate", "fast"}
        Inference mode: average all heads, or use only the head at ``prune_level`` and skip
        every deeper node. Switch it later with :meth:`UNetPlusPlus.set_mode`.
    prune_level : int
        Head used in fast mode, 1 to ``depth`` (the paper reports L1 to L4).

    Returns
    -------
    UNetPlusPlus
        In eval mode maps ``(N, in_channels, H, W)`` float tensors to ``(N, num_classes, H, W)``
        logits for any ``H`` and ``W``; in training mode returns ``{"out": logits, "aux": [...]}``.
    """
    return UNetPlusPlus(in_channels, num_classes, width, depth, norm, mode, prune_level)
