"""Architectures by name. Each module holds one architecture and its builder function."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .kidney_segnet import kidney_segnet
from .mask_rcnn import mask_rcnn
from .micronet import micronet
from .residual_unet import residual_unet
from .unet import unet
from .unet_plus_plus import MODES as UNET_PLUS_PLUS_MODES
from .unet_plus_plus import unet_plus_plus

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "unet": unet,
    "unet_plus_plus": unet_plus_plus,
    "residual_unet": residual_unet,
    "kidney_segnet": kidney_segnet,
    "micronet": micronet,
    "mask_rcnn": mask_rcnn,
}

# Architectures whose networks can switch inference mode after loading (``network.set_mode``).
INFERENCE_MODES: dict[str, tuple[str, ...]] = {
    "unet_plus_plus": UNET_PLUS_PLUS_MODES,
}


# Architectures that detect instances themselves (their networks have ``predicts_instances``);
# the others classify pixels into background / interior / boundary.
INSTANCE_ARCHITECTURES: frozenset[str] = frozenset({"mask_rcnn"})


def build_architecture(name: str, **kwargs) -> nn.Module:
    """Build an untrained network by architecture name with builder keyword arguments."""
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"Unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    return builder(**kwargs)
