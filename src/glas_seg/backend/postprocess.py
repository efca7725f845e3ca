"""Class probabilities -> instance labels (marker-controlled watershed)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels, relabel_sequential, watershed
from skimage.transform import resize

from .labelmaps import compact_ids


def fill_holes_per_object(labels: np.ndarray) -> np.ndarray:
    """Fill the holes of each object without letting one object flood into another.

    A hole is filled only where it is background, inside the object's bounding box.

    Parameters
    ----------
    labels : ndarray of int, shape ``(H, W)``

    Returns
    -------
    ndarray, same shape and dtype.
    """
    if labels.size and labels.max() > labels.size:
        # find_objects allocates one entry per id up to the largest: compact huge sparse ids first.
        ids, index, _ = compact_ids(labels)
        return np.concatenate([[0], ids])[fill_holes_per_object(index)].astype(labels.dtype)
    out = labels.copy()
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        crop = labels[box]
        filled = ndi.binary_fill_holes(crop == index)
        out[box][filled & (crop == 0)] = index
    return out


def remove_small_labels(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set objects with fewer than ``min_size`` pixels to background (other ids unchanged).

    Written with ``bincount`` rather than ``skimage.morphology.remove_small_objects`` because
    that function's size argument changed meaning in scikit-image 0.26.

    Parameters
    ----------
    labels : ndarray of non-negative int, any shape

    Returns
    -------
    ndarray, same shape and dtype (a copy).
    """
    labels = np.asarray(labels)
    if labels.size == 0 or min_size <= 1:
        return labels.copy()
    _, index, areas = compact_ids(labels)
    small = np.concatenate([[False], areas < min_size])  # indexed like ``index``: 0 is background
    out = labels.copy()
    out[small[index]] = 0
    return out


def instances_from_probabilities(
    probabilities: np.ndarray,
    min_size: int = 100,
    interior_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
) -> np.ndarray:
    """Split foreground into instances seeded from confident interiors.

    Parameters
    ----------
    probabilities : ndarray of float, shape ``(3, H, W)``
        Background, interior and boundary probabilities (summing to 1 per pixel).
    min_size : int
        Objects (and seeds) smaller than this many pixels are removed; seeds use a quarter.
    interior_threshold : float
        Interior probability above which a pixel seeds an object.
    foreground_threshold : float
        ``1 - p(background)`` above which a pixel belongs to some object.

    Returns
    -------
    labels : ndarray of int32, shape ``(H, W)``
        0 background, objects numbered 1..N.
    """
    if probabilities.ndim != 3 or probabilities.shape[0] != 3:
        raise ValueError(f"Expected (3, H, W) probabilities, got {probabilities.shape}")
    interior = probabilities[1]
    foreground = (1.0 - probabilities[0]) > foreground_threshold
    seeds, _ = ndi.label(interior > interior_threshold)
    seeds = remove_small_labels(seeds, max(1, min_size // 4))
    labels = watershed(-interior, seeds, mask=foreground)
    # Foreground with no seed (e.g. a thin gland predicted as all boundary) becomes its own object.
    orphans, n_orphans = ndi.label(foreground & (labels == 0))
    if n_orphans:
        labels = np.where(orphans > 0, orphans + labels.max(), labels)
    labels = fill_holes_per_object(labels)
    labels = remove_small_labels(labels, min_size)
    return relabel_sequential(labels)[0].astype(np.int32)


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (ids are never blended)."""
    if labels.shape == tuple(shape):
        return labels
    rows = np.minimum((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0], labels.shape[0] - 1).astype(np.intp)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1], labels.shape[1] - 1).astype(np.intp)
    return labels[rows[:, None], cols[None, :]]


def labels_from_probabilities(
    probabilities: np.ndarray,
    shape: tuple[int, int],
    *,
    min_size: int,
    scale: float,
    glass: np.ndarray | None = None,
    interior_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
) -> np.ndarray:
    """Instance labels of a whole image from a pixel classifier's working-scale probabilities.

    The one post-processing path of :func:`.inference.segment` (and of threshold calibration,
    which runs it many times on the same probabilities): watershed at the working scale,
    smooth outlines at full resolution, glass cleared.

    Parameters
    ----------
    probabilities : ndarray of float, shape ``(3, h, w)``
    shape : (H, W)
        Full-resolution shape.
    min_size : int
        Smallest object in full-resolution pixels (``min_size * scale**2`` at the working scale).
    scale : float
        Working scale (``h / H``).
    glass : ndarray of bool, shape ``(H, W)``, optional
        Pixels that stay background (:func:`.tissue.glass_mask`).
    interior_threshold, foreground_threshold : float
        As for :func:`instances_from_probabilities`.

    Returns
    -------
    ndarray of int32, shape ``(H, W)``
    """
    working_min_size = max(1, round(min_size * scale**2))
    labels = instances_from_probabilities(probabilities, min_size=working_min_size,
                                          interior_threshold=interior_threshold,
                                          foreground_threshold=foreground_threshold)
    labels = labels_at_full_resolution(labels, 1.0 - probabilities[0], shape, threshold=foreground_threshold)
    if glass is not None and glass.any():
        labels[glass] = 0
        labels = relabel_sequential(remove_small_labels(labels, min_size))[0].astype(np.int32)
    return labels


def labels_at_full_resolution(labels: np.ndarray, foreground: np.ndarray, shape: tuple[int, int],
                              threshold: float = 0.5) -> np.ndarray:
    """Upsample instance labels with outlines taken from the smoothly upsampled foreground.

    Nearest-neighbour upsampling alone gives stair-stepped outlines, up to one working pixel
    (two image pixels at scale 0.5) off. Here each object's id comes from the nearest
    neighbour, grown by up to one working pixel, and its extent from the bilinearly upsampled
    foreground probability thresholded as the watershed's foreground was.

    Parameters
    ----------
    labels : ndarray of int, shape ``(h, w)``
        Instances at the working scale.
    foreground : ndarray of float, shape ``(h, w)``
        Probability of belonging to some object, at the working scale.
    shape : (H, W)
        Output shape.
    threshold : float
        Foreground threshold (the watershed's).

    Returns
    -------
    ndarray, shape ``(H, W)``, dtype of ``labels``
    """
    shape = tuple(int(s) for s in shape)
    if labels.shape == shape:
        return labels
    if foreground.shape != labels.shape:
        raise ValueError(f"foreground {foreground.shape} and labels {labels.shape} differ in shape")
    smooth = resize(foreground.astype(np.float32), shape, order=1, mode="edge", anti_aliasing=False) > threshold
    factor = max(shape[0] / labels.shape[0], shape[1] / labels.shape[1])
    grown = expand_labels_in_strips(resize_labels(labels, shape), distance=int(np.ceil(factor)))
    grown[~smooth] = 0
    return grown.astype(labels.dtype, copy=False)


def expand_labels_in_strips(labels: np.ndarray, distance: int, strip: int = 256) -> np.ndarray:
    """:func:`skimage.segmentation.expand_labels`, a strip of rows at a time.

    The whole-image version needs about 33 bytes per pixel (a float64 distance map and its
    index arrays: 220 MB on a 6.6 MP slide window). Every pixel it fills takes the id of a
    pixel at most ``distance`` away, so a strip plus ``distance`` rows above and below sees
    every candidate; the result equals the whole-image one (tested on real predictions).

    Parameters
    ----------
    labels : ndarray of int, shape ``(H, W)``
    distance : int
    strip : int
        Rows per strip.

    Returns
    -------
    ndarray, shape and dtype of ``labels`` (a new array)
    """
    out = np.empty_like(labels)
    height = labels.shape[0]
    for start in range(0, height, strip):
        top, bottom = max(0, start - distance), min(height, start + strip + distance)
        grown = expand_labels(labels[top:bottom], distance=distance)
        out[start : start + strip] = grown[start - top : start - top + min(strip, height - start)]
    return out
