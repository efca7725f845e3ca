"""Planes of image stacks (Z, T, ...) and fingerprints of label arrays."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np


def spatial_ndim(rgb: bool) -> int:
    """Trailing axes that make one plane: ``(H, W, C)`` for RGB, ``(H, W)`` otherwise."""
    return 3 if rgb else 2


def leading_shape(shape: tuple[int, ...], rgb: bool) -> tuple[int, ...]:
    """Shape of the stack axes in front of a plane (``()`` for a single 2D image)."""
    n = spatial_ndim(rgb)
    if len(shape) < n:
        raise ValueError(f"An image with shape {shape} has no 2D plane")
    return tuple(shape[: len(shape) - n])


def all_planes(shape: tuple[int, ...], rgb: bool) -> list[tuple[int, ...]]:
    """Index tuples of every plane of a stack, in C order."""
    return list(itertools.product(*(range(n) for n in leading_shape(shape, rgb))))


def fingerprint(array: np.ndarray) -> str:
    """Content hash of an array, to tell whether the user has edited a layer since we wrote it."""
    array = np.ascontiguousarray(array)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((array.shape, array.dtype.str)).encode())
    digest.update(array.data)
    return digest.hexdigest()
