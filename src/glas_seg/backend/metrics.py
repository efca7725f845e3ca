"""Segmentation metrics: GlaS object detection F1 and pixel overlap.

The GlaS object metrics are written here because no maintained library implements the
challenge's exact definitions (partner = most-overlapping object; > 50 % coverage rule).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse


def _check_pair(seg: np.ndarray, gt: np.ndarray) -> None:
    if seg.shape != gt.shape:
        raise ValueError(f"Segmentation {seg.shape} and ground truth {gt.shape} differ in shape")


def contingency(seg: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, sparse.csr_matrix]:
    """Overlap table between the objects of two label maps, in one pass over the pixels.

    Parameters
    ----------
    seg, gt : ndarray of int, same shape
        Label maps (0 = background); ids need not be sequential.

    Returns
    -------
    seg_ids : ndarray, shape ``(S,)``
        Nonzero ids present in ``seg``.
    gt_ids : ndarray, shape ``(G,)``
        Nonzero ids present in ``gt``.
    table : csr_matrix, shape ``(S + 1, G + 1)``
        ``table[i, j]`` = pixels where ``seg`` has ``seg_ids[i - 1]`` (row 0 = background) and
        ``gt`` has ``gt_ids[j - 1]`` (column 0 = background).
    """
    _check_pair(seg, gt)
    seg_ids, seg_index = np.unique(seg.ravel(), return_inverse=True)
    gt_ids, gt_index = np.unique(gt.ravel(), return_inverse=True)
    # np.unique sorts, so background (0), when present, is index 0; shift when it is absent.
    seg_index = seg_index + (0 if seg_ids.size and seg_ids[0] == 0 else 1)
    gt_index = gt_index + (0 if gt_ids.size and gt_ids[0] == 0 else 1)
    seg_ids, gt_ids = seg_ids[seg_ids != 0], gt_ids[gt_ids != 0]
    ones = np.ones(seg_index.size, dtype=np.int64)
    table = sparse.coo_matrix((ones, (seg_index, gt_index)), shape=(seg_ids.size + 1, gt_ids.size + 1)).tocsr()
    return seg_ids, gt_ids, table


def object_detection_counts(seg: np.ndarray, gt: np.ndarray) -> dict[str, int]:
    """GlaS true positives, false positives and false negatives.

    A segmented object is a true positive when it covers more than 50 % of its partner, the
    ground-truth object it overlaps most; otherwise it is a false positive. Ground-truth
    objects that are no segmented object's true-positive partner are false negatives.

    Returns
    -------
    dict with integer ``tp``, ``fp``, ``fn``.
    """
    seg_ids, gt_ids, table = contingency(seg, gt)
    if seg_ids.size == 0:
        return {"tp": 0, "fp": 0, "fn": int(gt_ids.size)}
    overlaps = table[1:, 1:].toarray()
    gt_area = np.asarray(table[:, 1:].sum(axis=0)).ravel()
    if gt_ids.size == 0:
        return {"tp": 0, "fp": int(seg_ids.size), "fn": 0}
    partner = overlaps.argmax(axis=1)
    best = overlaps[np.arange(seg_ids.size), partner]
    is_tp = best > 0.5 * gt_area[partner]
    # Two segmented objects cannot both cover more than half of one ground-truth object.
    tp = int(is_tp.sum())
    return {"tp": tp, "fp": int(seg_ids.size - tp), "fn": int(gt_ids.size - np.unique(partner[is_tp]).size)}


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """F1 = 2 TP / (2 TP + FP + FN); 1.0 when there is nothing to find and nothing found."""
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2 * tp / denominator


def object_f1(seg: np.ndarray, gt: np.ndarray) -> float:
    """GlaS object-level detection F1 of one image (see :func:`object_detection_counts`)."""
    return f1_from_counts(**object_detection_counts(seg, gt))


def pixel_dice(seg: np.ndarray, gt: np.ndarray) -> float:
    """Dice of the foreground masks (any nonzero id); 1.0 when both are empty."""
    _check_pair(seg, gt)
    a, b = np.asarray(seg) > 0, np.asarray(gt) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
