"""Small helpers on instance label maps shared by metrics, editing, post-processing and data:
compact ids, bounding boxes and label-map file names. NumPy only (no torch, no scikit-image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import GlasSegError
from .image_io import IMAGE_SUFFIXES, LABEL_SUFFIXES


def compact_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Object ids, a per-pixel index into them (0 = background) and the object areas.

    Tables indexed by object (overlaps, ``find_objects`` boxes, sizes) then cost memory in the
    number of objects, never in the size of the largest id.

    Parameters
    ----------
    labels : ndarray of non-negative int or bool, any shape

    Returns
    -------
    ids : ndarray, shape ``(N,)``, the sorted nonzero ids, dtype of ``labels``
    index : ndarray of int32 or intp, shape ``labels.shape``; 0 for background, ``k`` where
        ``labels == ids[k - 1]``
    areas : ndarray of int64, shape ``(N,)``, pixels per object

    Raises
    ------
    GlasSegError
        Negative ids.
    """
    flat = np.asarray(labels).ravel()
    if flat.dtype == bool:
        flat = flat.view(np.uint8)
    if flat.size and flat.min() < 0:
        raise GlasSegError("Label maps must not hold negative ids")
    top = int(flat.max(initial=0))
    if top <= max(flat.size, 1 << 16):  # a lookup table is cheaper than sorting the pixels
        counts = np.bincount(flat.astype(np.intp, copy=False), minlength=1)
        present = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(top + 1, dtype=np.int32 if present.size < 2**31 - 1 else np.intp)
        lut[present] = np.arange(1, present.size + 1)
        return present.astype(flat.dtype), lut[flat].reshape(np.shape(labels)), counts[present].astype(np.int64)
    ids, index, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if ids[0] != 0:
        ids, index, counts = np.concatenate([[0], ids]), index + 1, np.concatenate([[0], counts])
    return ids[1:], index.reshape(np.shape(labels)), counts[1:].astype(np.int64)


def bounding_box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """Bounding box of the True pixels of a 2D mask, as slices; None when there are none."""
    rows = np.flatnonzero(np.any(mask, axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(np.any(mask, axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def label_stem(stem: str) -> str | None:
    """``"X"`` for a label-map file stem ``X_anno`` / ``X_labels`` / ``X_label`` / ``X_mask`` /
    ``X_gt``; None for any other stem."""
    for suffix in LABEL_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return None


def label_files(folder: str | Path, plain: bool = True) -> dict[str, Path]:
    """The label maps of a folder by image name: the one rule for pairing files by name.

    ``X_anno.bmp``, ``X_labels.tif`` (``_label``, ``_mask``, ``_gt``; any image suffix) are the
    label map of ``X``. With ``plain``, a file ``X.tif`` / ``X.png`` without such a suffix is
    too, unless a suffixed one exists (a GlaS folder holds the image ``X.bmp`` next to
    ``X_anno.bmp``); without ``plain`` (a folder of images and labels together), only suffixed
    files are label maps.

    Raises
    ------
    FileNotFoundError
        No such folder.
    GlasSegError
        Two label maps of the same rank for one name (``X_anno.png`` and ``X_labels.tif``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No such folder: {folder}")
    chosen: dict[str, tuple[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        base = label_stem(path.stem)
        if base is None and not plain:
            continue
        name, rank = (path.stem, 0) if base is None else (base, 1)
        if name in chosen and chosen[name][0] == rank:
            raise GlasSegError(f"Ambiguous label files for {name!r} in {folder}: {chosen[name][1].name} and {path.name}")
        if name not in chosen or rank > chosen[name][0]:
            chosen[name] = (rank, path)
    return {name: path for name, (_, path) in chosen.items()}
