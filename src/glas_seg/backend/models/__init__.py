"""Architectures by name. Each module holds one architecture and its builder function."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .unet import unet

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "unet": unet,
}


def build_architecture(name: str, **kwargs) -> nn.Module:
    """Build an untrained network by architecture name with builder keyword arguments."""
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"Unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    return builder(**kwargs)
