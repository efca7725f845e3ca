"""Instances detected tile by tile -> one label map (for networks that predict instances).

Written by hand: neither torchvision nor scikit-image merges per-tile instance masks. A tile
sees an object either whole or cut by its edge; overlapping tiles see the same object more
than once. Whole objects are placed first (highest score first); a later piece that covers a
good part of an object already placed is the same object seen again (or the rest of an object
cut by a tile edge) and is merged into it, anything else becomes a new object. Objects never
overwrite each other's pixels.

Each tile also *owns* the part of the image nearer its centre than any other tile's (its core):
a whole object whose box centre lies outside the core is left to the tile that owns that spot,
which sees it with more context around it. On the GlaS validation images this removed a fifth
of the extra objects that small tiles produce (docs/benchmarks.md, *Mask R-CNN tile stitching*).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.segmentation import relabel_sequential

from .labelmaps import bounding_box
from .postprocess import remove_small_labels


@dataclass
class Piece:
    """One detected object of one tile, in image coordinates.

    score : float
        Detector confidence in [0, 1].
    top, left : int
        Position of ``mask`` in the image.
    mask : bool ndarray ``(h, w)``
        The object within its bounding box.
    cut : bool
        The mask touches a tile edge inside the image, so the object may go on in a neighbour tile.
    """

    score: float
    top: int
    left: int
    mask: np.ndarray
    cut: bool


def tile_cores(boxes: list[tuple[int, int]], tile_shape: tuple[int, int]) -> dict:
    """The part of the image each tile owns: the points nearer its centre than any other tile's.

    Parameters
    ----------
    boxes : list of (top, left)
        Tile positions on a grid (every combination of the tops and lefts that occur).
    tile_shape : (th, tw)

    Returns
    -------
    dict mapping (top, left) to its core ``(y0, y1, x0, x1)``, half-open, in image coordinates
    (unbounded on the image's outer sides).
    """

    def axis(starts: list[int], size: int) -> dict[int, tuple[float, float]]:
        centres = [s + size / 2 for s in starts]
        bounds = [-np.inf] + [(a + b) / 2 for a, b in zip(centres, centres[1:])] + [np.inf]
        return {s: (bounds[i], bounds[i + 1]) for i, s in enumerate(starts)}

    rows = axis(sorted({top for top, _ in boxes}), tile_shape[0])
    cols = axis(sorted({left for _, left in boxes}), tile_shape[1])
    return {(top, left): (*rows[top], *cols[left]) for top, left in boxes}


def pieces_from_tile(
    masks: np.ndarray, scores: np.ndarray, top: int, left: int, image_shape: tuple[int, int],
    mask_threshold: float = 0.5, core: tuple[float, float, float, float] | None = None,
) -> list[Piece]:
    """Turn one tile's detections into :class:`Piece` objects in image coordinates.

    Parameters
    ----------
    masks : float ndarray ``(K, th, tw)``
        Mask probabilities of the tile's detections (may extend past the image into padding).
    scores : float ndarray ``(K,)``
    top, left : int
        Tile position in the image.
    image_shape : (H, W)
        Image size; tile edges on the image border do not cut objects.
    core : (y0, y1, x0, x1), optional
        The part of the image this tile owns (:func:`tile_cores`); whole objects centred
        outside it are dropped. Cut objects are always kept: no tile sees them whole.
    """
    height, width = image_shape
    pieces = []
    for probabilities, score in zip(masks, scores):
        binary = probabilities[: max(0, height - top), : max(0, width - left)] > mask_threshold
        if not binary.any():
            continue
        rows, cols = bounding_box(binary)
        r0, r1, c0, c1 = rows.start, rows.stop, cols.start, cols.stop
        th, tw = probabilities.shape
        cut = bool((r0 == 0 and top > 0) or (c0 == 0 and left > 0)
                   or (r1 == th and top + th < height) or (c1 == tw and left + tw < width))
        if core is not None and not cut:
            centre_y, centre_x = top + (r0 + r1) / 2, left + (c0 + c1) / 2
            if not (core[0] <= centre_y < core[1] and core[2] <= centre_x < core[3]):
                continue
        pieces.append(Piece(float(score), top + int(r0), left + int(c0), binary[r0:r1, c0:c1], cut))
    return pieces


def stitch_pieces(pieces: list[Piece], shape: tuple[int, int], min_overlap: float = 0.3,
                  min_size: int = 1) -> np.ndarray:
    """Paint pieces into one instance label map.

    Parameters
    ----------
    pieces : list of Piece
    shape : (H, W)
    min_overlap : float
        A piece joins an object already placed when their intersection is at least this
        fraction of the smaller of the two.
    min_size : int
        Objects with fewer pixels are removed at the end.

    Returns
    -------
    labels : int32 ndarray ``(H, W)``, 0 background, objects numbered 1..N.
    """
    labels = np.zeros(shape, np.int32)
    areas: dict[int, int] = {}
    next_id = 1
    for piece in sorted(pieces, key=lambda p: (p.cut, -p.score)):
        h, w = piece.mask.shape
        window = labels[piece.top : piece.top + h, piece.left : piece.left + w]
        mask = piece.mask[: window.shape[0], : window.shape[1]]
        area = int(mask.sum())
        under = window[mask]
        ids, counts = np.unique(under[under > 0], return_counts=True)
        target = None
        if ids.size:
            fractions = counts / np.minimum(area, [areas[i] for i in ids])
            best = int(np.argmax(fractions))
            if fractions[best] >= min_overlap:
                target = int(ids[best])
        if target is None:
            target, next_id = next_id, next_id + 1
            areas[target] = 0
        free = mask & (window == 0)
        window[free] = target
        areas[target] += int(free.sum())
    labels = remove_small_labels(labels, min_size)
    return relabel_sequential(labels)[0].astype(np.int32)
