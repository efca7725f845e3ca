"""Instance labels -> per-pixel training targets for the contour-aware head."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import find_boundaries

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2


def contour_targets(labels: np.ndarray) -> np.ndarray:
    """Three-class target map: background, object interior, object boundary.

    The boundary class is the thick boundary of every object (pixels on both sides of an
    edge between two objects, or between an object and background), so that touching objects
    are always separated by boundary pixels.

    Parameters
    ----------
    labels : ndarray of int, shape ``(H, W)``
        Instance labels, 0 = background.

    Returns
    -------
    targets : ndarray of uint8, shape ``(H, W)``
        0 background, 1 interior, 2 boundary.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2D, got shape {labels.shape}")
    targets = (labels > 0).astype(np.uint8) * INTERIOR
    targets[find_boundaries(labels, mode="thick")] = BOUNDARY
    return targets
