"""Instance labels -> per-pixel training targets for the contour-aware head."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import find_boundaries

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
CONTOUR_MODES = ("outer", "inner")


def contour_targets(labels: np.ndarray, mode: str = "outer") -> np.ndarray:
    """Three-class target map: background, object interior, object boundary.

    Parameters
    ----------
    labels : ndarray of int, shape ``(H, W)``
        Instance labels, 0 = background.
    mode : {"outer", "inner"}
        ``"outer"``: the thick boundary of every object (pixels on both sides of every edge,
        one of them outside the object), as the older bundled models were trained; their
        foreground then reaches one pixel beyond each object. ``"inner"``: only the object's
        own outermost pixels, so interior + boundary is exactly the object; touching objects
        are still separated, by the two inner rings that meet.

    Returns
    -------
    targets : ndarray of uint8, shape ``(H, W)``
        0 background, 1 interior, 2 boundary.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2D, got shape {labels.shape}")
    if mode not in CONTOUR_MODES:
        raise ValueError(f"mode must be one of {CONTOUR_MODES}, got {mode!r}")
    targets = (labels > 0).astype(np.uint8) * INTERIOR
    if mode == "outer":
        targets[find_boundaries(labels, mode="thick")] = BOUNDARY
    else:
        targets[find_boundaries(labels, mode="inner") & (labels > 0)] = BOUNDARY
    return targets
