"""GlaS object metrics: detection F1, object Dice and object Hausdorff.

These are written here by hand because no maintained library implements the exact definitions
of the GlaS@MICCAI'2015 challenge (Sirinukunwattana et al., Medical Image Analysis 35, 2017):
the partner of an object is the object on the other side that it overlaps most, a detection
needs more than 50 % coverage of the partner, and object Dice / Hausdorff are area-weighted
sums taken from both sides. ``docs/metrics.md`` lists every choice made where the challenge
text or its Matlab code leaves room.

Every function takes 2D label maps (0 = background, any non-negative integer ids, kept as
given: an id made of several pieces is one object). Arrays with more than two axes are stacks
of 2D planes (the last two axes); each plane is an image and the planes are pooled like the
images of a challenge test part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage, sparse

from .errors import GlasSegError
from .metrics_distance import hausdorff_distance, side_hausdorff  # noqa: F401 (public here too)
from .labelmaps import compact_ids as _compact  # shared with editing and post-processing

# Dense contingency tables up to this many cells; larger ones (thousands of nuclei) are sparse.
_DENSE_TABLE_CELLS = 4_000_000


def _check_pair(seg: np.ndarray, gt: np.ndarray) -> None:
    if seg.shape != gt.shape:
        raise GlasSegError(f"Segmentation {seg.shape} and ground truth {gt.shape} differ in shape")
    for name, labels in (("Segmentation", seg), ("Ground truth", gt)):
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise GlasSegError(f"{name} must be an integer label map, got dtype {labels.dtype}")
        if labels.ndim < 2:
            raise GlasSegError(f"{name} must have at least two axes, got shape {labels.shape}")
        # Every metric refuses negative ids (not only the object metrics, via _compact), so that
        # pixel Dice never scores a map the others call invalid.
        if labels.size and labels.dtype.kind == "i" and labels.min() < 0:
            raise GlasSegError(f"{name} holds negative ids (min {int(labels.min())}); ids must be 0 (background) or more")


def _table(seg_index: np.ndarray, gt_index: np.ndarray, n_seg: int, n_gt: int) -> sparse.coo_matrix:
    """Pixel counts of every (seg index, gt index) pair, shape ``(n_seg + 1, n_gt + 1)``."""
    shape = (n_seg + 1, n_gt + 1)
    keys = seg_index.ravel().astype(np.intp) * shape[1] + gt_index.ravel()
    if shape[0] * shape[1] <= _DENSE_TABLE_CELLS:
        return sparse.coo_matrix(np.bincount(keys, minlength=shape[0] * shape[1]).reshape(shape))
    pairs, counts = np.unique(keys, return_counts=True)
    return sparse.coo_matrix((counts, np.divmod(pairs, shape[1])), shape=shape)


def contingency(seg: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, sparse.csr_matrix]:
    """Overlap table between the objects of two label maps, in one pass over the pixels.

    Parameters
    ----------
    seg, gt : ndarray of int, same shape
        Label maps (0 = background); ids need not be sequential.

    Returns
    -------
    seg_ids : ndarray, shape ``(S,)``
        Nonzero ids present in ``seg``, sorted.
    gt_ids : ndarray, shape ``(G,)``
        Nonzero ids present in ``gt``, sorted.
    table : csr_matrix of int64, shape ``(S + 1, G + 1)``
        ``table[i, j]`` = pixels where ``seg`` has ``seg_ids[i - 1]`` (row 0 = background) and
        ``gt`` has ``gt_ids[j - 1]`` (column 0 = background).
    """
    seg, gt = np.asarray(seg), np.asarray(gt)
    _check_pair(seg, gt)
    seg_ids, seg_index, _ = _compact(seg)
    gt_ids, gt_index, _ = _compact(gt)
    return seg_ids, gt_ids, _table(seg_index, gt_index, seg_ids.size, gt_ids.size).tocsr()


def _best_partner(rows: np.ndarray, cols: np.ndarray, counts: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row 1..n_rows: the column (>= 1) with the largest count, and that count.

    Ties go to the smallest column, i.e. the smallest id, as Matlab's ``mode`` in the
    challenge code does. Rows without any overlap get column 0 and count 0.
    """
    keep = (rows > 0) & (cols > 0) & (counts > 0)
    rows, cols, counts = rows[keep], cols[keep], counts[keep]
    order = np.lexsort((cols, -counts, rows))
    first_rows, first = np.unique(rows[order], return_index=True)
    partner = np.zeros(n_rows + 1, dtype=np.intp)
    overlap = np.zeros(n_rows + 1, dtype=np.int64)
    partner[first_rows] = cols[order][first]
    overlap[first_rows] = counts[order][first]
    return partner[1:], overlap[1:]


@dataclass(frozen=True)
class ObjectMatches:
    """Every object of one 2D image pair with its partner and its scores.

    ``seg_*`` arrays have shape ``(S,)`` (one entry per segmented object, ids sorted) and
    ``gt_*`` arrays shape ``(G,)``. Partners are ids on the other side (0 = no overlap).
    ``*_hausdorff`` is the distance to the partner or, without one, to the nearest object on
    the other side (``inf`` when that side has no object). ``seg_tp`` marks true positives,
    ``gt_detected`` ground-truth objects that are some true positive's partner.
    """

    seg_ids: np.ndarray
    seg_area: np.ndarray
    seg_partner: np.ndarray
    seg_tp: np.ndarray
    seg_dice: np.ndarray
    seg_hausdorff: np.ndarray
    gt_ids: np.ndarray
    gt_area: np.ndarray
    gt_partner: np.ndarray
    gt_detected: np.ndarray
    gt_dice: np.ndarray
    gt_hausdorff: np.ndarray

    @property
    def false_positive_ids(self) -> np.ndarray:
        return self.seg_ids[~self.seg_tp]

    @property
    def false_negative_ids(self) -> np.ndarray:
        return self.gt_ids[~self.gt_detected]


def match_objects(seg: np.ndarray, gt: np.ndarray) -> ObjectMatches:
    """Pair the objects of one 2D segmentation and its ground truth, the GlaS way.

    Parameters
    ----------
    seg, gt : ndarray of int (or bool), shape ``(H, W)``
        Segmented and ground-truth label maps; 0 is background.

    Returns
    -------
    ObjectMatches
        Per-object partners, detections, Dice and Hausdorff distances.

    Raises
    ------
    ValueError
        For different shapes, non-integer dtypes, negative ids or arrays that are not 2D.
    """
    seg, gt = np.asarray(seg), np.asarray(gt)
    _check_pair(seg, gt)
    if seg.ndim != 2:
        raise ValueError(f"match_objects takes one 2D plane, got shape {seg.shape}; use planes() for stacks")
    seg_ids, seg_index, seg_area = _compact(seg)
    gt_ids, gt_index, gt_area = _compact(gt)
    table = _table(seg_index, gt_index, seg_ids.size, gt_ids.size)
    rows, cols, counts = table.row, table.col, table.data
    seg_partner, seg_overlap = _best_partner(rows, cols, counts, seg_ids.size)
    gt_partner, gt_overlap = _best_partner(cols, rows, counts, gt_ids.size)

    # Index 0 of these padded arrays stands for "no partner" (area 0, id 0).
    seg_area_0, gt_area_0 = np.r_[0, seg_area], np.r_[0, gt_area]
    seg_tp = (seg_partner > 0) & (seg_overlap > 0.5 * gt_area_0[seg_partner])
    gt_detected = np.zeros(gt_ids.size, dtype=bool)
    gt_detected[seg_partner[seg_tp] - 1] = True
    seg_dice = 2.0 * seg_overlap / (seg_area + gt_area_0[seg_partner])  # 0 without a partner
    gt_dice = 2.0 * gt_overlap / (gt_area + seg_area_0[gt_partner])

    seg_boxes = ndimage.find_objects(seg_index, seg_ids.size)
    gt_boxes = ndimage.find_objects(gt_index, gt_ids.size)
    cache: dict = {}  # (seg index, gt index) -> distance, shared by both sides
    seg_h = side_hausdorff(seg_index, seg_boxes, seg_partner, gt_index, gt_boxes, cache, flip=False)
    gt_h = side_hausdorff(gt_index, gt_boxes, gt_partner, seg_index, seg_boxes, cache, flip=True)

    return ObjectMatches(
        seg_ids=seg_ids, seg_area=seg_area, seg_partner=_with_zero(gt_ids)[seg_partner], seg_tp=seg_tp,
        seg_dice=seg_dice, seg_hausdorff=seg_h,
        gt_ids=gt_ids, gt_area=gt_area, gt_partner=_with_zero(seg_ids)[gt_partner], gt_detected=gt_detected,
        gt_dice=gt_dice, gt_hausdorff=gt_h,
    )


def _with_zero(ids: np.ndarray) -> np.ndarray:
    """``ids`` with a 0 in front, same dtype: index 0 means "no partner"."""
    return np.concatenate([np.zeros(1, ids.dtype), ids])


def planes(shape: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """Index tuples of the 2D planes (last two axes) of an array of ``shape``; ``()`` for 2D."""
    return np.ndindex(*shape[:-2]) if len(shape) > 2 else iter([()])


def match_stack(seg: np.ndarray, gt: np.ndarray) -> list[ObjectMatches]:
    """:func:`match_objects` of every 2D plane of two label arrays of the same shape."""
    seg, gt = np.asarray(seg), np.asarray(gt)
    _check_pair(seg, gt)
    return [match_objects(seg[index], gt[index]) for index in planes(seg.shape)]


def _weighted(area: np.ndarray, score: np.ndarray) -> float:
    """Σ area × score / Σ area; 0 for no objects (an empty sum)."""
    total = area.sum()
    return float((area * score).sum() / total) if total else 0.0


def object_scores(matches: Sequence[ObjectMatches]) -> dict[str, float]:
    """GlaS object scores of one image or, pooled as in the challenge, of a set of images.

    TP / FP / FN are summed over the images, and the area weights of object Dice and object
    Hausdorff are normalised by the total segmented / ground-truth area of the whole set.

    Returns
    -------
    dict
        ``object_f1``, ``object_precision``, ``object_recall``, ``object_dice``,
        ``object_hausdorff`` (pixels) as floats; ``tp``, ``fp``, ``fn``, ``n_pred``, ``n_gt``,
        ``count_error`` (n_pred - n_gt) as ints. With no object on either side: F1 = Dice = 1
        and Hausdorff = 0; with objects on one side only: F1 = Dice = 0 and Hausdorff = inf.
    """
    cat = {f: np.concatenate([getattr(m, f) for m in matches]) if matches else np.empty(0)
           for f in ("seg_area", "seg_tp", "seg_dice", "seg_hausdorff", "gt_area", "gt_detected", "gt_dice", "gt_hausdorff")}
    n_pred, n_gt = cat["seg_area"].size, cat["gt_area"].size
    tp = int(cat["seg_tp"].sum())
    fn = int(n_gt - cat["gt_detected"].sum())
    if n_pred == 0 and n_gt == 0:
        dice, hausdorff = 1.0, 0.0
    else:
        dice = 0.5 * (_weighted(cat["seg_area"], cat["seg_dice"]) + _weighted(cat["gt_area"], cat["gt_dice"]))
        hausdorff = 0.5 * (_weighted(cat["seg_area"], cat["seg_hausdorff"]) + _weighted(cat["gt_area"], cat["gt_hausdorff"]))
    return {
        "object_f1": f1_from_counts(tp, n_pred - tp, fn),
        "object_precision": tp / n_pred if n_pred else float(n_gt == 0),
        "object_recall": tp / n_gt if n_gt else float(n_pred == 0),
        "object_dice": float(dice),
        "object_hausdorff": float(hausdorff),
        "tp": tp, "fp": n_pred - tp, "fn": fn,
        "n_pred": n_pred, "n_gt": n_gt, "count_error": n_pred - n_gt,
    }


def object_detection_counts(seg: np.ndarray, gt: np.ndarray) -> dict[str, int]:
    """GlaS true positives, false positives and false negatives (summed over planes).

    A segmented object is a true positive when it covers more than 50 % of its partner, the
    ground-truth object it overlaps most; otherwise it is a false positive. Ground-truth
    objects that are no segmented object's true-positive partner are false negatives.

    Returns
    -------
    dict with integer ``tp``, ``fp``, ``fn``.
    """
    seg, gt = np.asarray(seg), np.asarray(gt)
    _check_pair(seg, gt)
    totals = {"tp": 0, "fp": 0, "fn": 0}
    for index in planes(seg.shape):
        seg_ids, seg_index, _ = _compact(seg[index])
        gt_ids, gt_index, gt_area = _compact(gt[index])
        table = _table(seg_index, gt_index, seg_ids.size, gt_ids.size)
        partner, overlap = _best_partner(table.row, table.col, table.data, seg_ids.size)
        tp = int(((partner > 0) & (overlap > 0.5 * np.r_[0, gt_area][partner])).sum())
        totals["tp"] += tp
        totals["fp"] += seg_ids.size - tp
        totals["fn"] += gt_ids.size - tp  # one object cannot hold > 50 % of a partner twice
    return totals


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """F1 = 2 TP / (2 TP + FP + FN); 1.0 when there is nothing to find and nothing found."""
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2 * tp / denominator


def object_f1(seg: np.ndarray, gt: np.ndarray) -> float:
    """GlaS object-level detection F1 (see :func:`object_detection_counts`)."""
    return f1_from_counts(**object_detection_counts(seg, gt))


def object_dice(seg: np.ndarray, gt: np.ndarray) -> float:
    """GlaS object Dice of one image (planes of a stack pooled); see :func:`object_scores`."""
    return object_scores(match_stack(seg, gt))["object_dice"]


def object_hausdorff(seg: np.ndarray, gt: np.ndarray) -> float:
    """GlaS object Hausdorff distance in pixels (planes of a stack pooled); see :func:`object_scores`."""
    return object_scores(match_stack(seg, gt))["object_hausdorff"]


def pixel_dice(seg: np.ndarray, gt: np.ndarray) -> float:
    """Dice of the foreground masks (any nonzero id); 1.0 when both are empty."""
    _check_pair(np.asarray(seg), np.asarray(gt))
    a, b = np.asarray(seg) > 0, np.asarray(gt) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
