"""Label editing: pure functions that correct an instance label image.

Every function takes a 2D label image (one plane; the napari widget passes the current plane of
a stack) and returns a new array of the same shape and dtype; the input is never modified.
Work is done on bounding-box crops, and nothing is ever allocated by the size of the largest id,
so ids may be huge and sparse (e.g. ``4_000_000_000`` in ``int64`` or ``uint32`` arrays).

Object ids are positive; 0 is background.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import line as draw_line
from skimage.morphology import disk
from skimage.segmentation import watershed

from .labelmaps import bounding_box as _bbox
from .labelmaps import compact_ids
from .postprocess import fill_holes_per_object, remove_small_labels

__all__ = [
    "delete_labels",
    "fill_holes",
    "free_ids",
    "merge_labels",
    "next_free_id",
    "rasterize_path",
    "relabel_sequentially",
    "remove_small",
    "smooth_labels",
    "split_along_line",
    "split_by_seeds",
]

_FOUR_CONNECTED = ndi.generate_binary_structure(2, 1)
# Ids up to this multiple of the array size are indexed directly (tables, ``find_objects``);
# above it the ids are compacted first, so memory never depends on how large an id is.
_DENSE_FACTOR = 4


# -- validation and helpers ---------------------------------------------------------------------
def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"Expected a 2D label image (one plane), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Expected an integer label image, got dtype {labels.dtype}")
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise ValueError("Label images must not contain negative ids")
    return labels


def _check_ids(ids: Iterable[int] | int, labels: np.ndarray) -> np.ndarray:
    """Distinct positive ids in their given order, as an array of the labels' dtype."""
    if isinstance(ids, (int, np.integer)):
        ids = [ids]
    values = [int(i) for i in ids]
    info = np.iinfo(labels.dtype)
    for value in values:
        if value <= 0:
            raise ValueError(f"ids must be positive object ids (0 is background), got {value}")
        if value > info.max:
            raise ValueError(f"Id {value} does not fit in a {labels.dtype} label image (max {info.max})")
    return np.asarray(list(dict.fromkeys(values)), dtype=labels.dtype)


def _grow(box: tuple[slice, slice], margin: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _is_dense(labels: np.ndarray) -> bool:
    return labels.size > 0 and int(labels.max()) <= _DENSE_FACTOR * labels.size


def _object_boxes(labels: np.ndarray) -> list[tuple[int, tuple[slice, slice]]]:
    """``(id, bounding box)`` of every object, in ascending id order."""
    if labels.size == 0:
        return []
    if _is_dense(labels):
        boxes = ndi.find_objects(labels.astype(np.intp, copy=False))
        return [(index, box) for index, box in enumerate(boxes, start=1) if box is not None]
    ids, index, _ = compact_ids(labels)
    return [(int(ids[k - 1]), box) for k, box in enumerate(ndi.find_objects(index), start=1) if box is not None]


def free_ids(labels: np.ndarray, count: int, start: int | None = None) -> np.ndarray:
    """``count`` ids that are not used in ``labels`` and fit its dtype.

    Parameters
    ----------
    labels : ndarray of int, any shape
    count : int
        How many ids are wanted.
    start : int, optional
        Return ``start, start + 1, ...`` (checked to be unused). By default the ids above the
        largest one are used, or, when they would overflow the dtype, the smallest unused ids.

    Returns
    -------
    ndarray of the labels' dtype, shape ``(count,)``, ascending.
    """
    labels = np.asarray(labels)
    top = int(np.iinfo(labels.dtype).max)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count == 0:
        return np.zeros(0, dtype=labels.dtype)
    if start is not None:
        if start <= 0 or start + count - 1 > top:
            raise ValueError(f"Ids {start}..{start + count - 1} do not fit in a {labels.dtype} label image")
        wanted = np.arange(start, start + count, dtype=labels.dtype)
        if np.isin(wanted, labels).any():
            raise ValueError(f"Some of the ids {start}..{start + count - 1} are already used")
        return wanted
    largest = int(labels.max()) if labels.size else 0
    if largest + count <= top:
        return np.arange(largest + 1, largest + count + 1, dtype=labels.dtype)
    used = np.unique(labels)
    used = used[used > 0].astype(np.uint64)
    found: list[int] = []
    candidate = 1
    for value in used.tolist() + [top + 1]:
        while candidate < value and len(found) < count:
            found.append(candidate)
            candidate += 1
        if len(found) == count:
            break
        candidate = value + 1
    if len(found) < count:
        raise ValueError(f"A {labels.dtype} label image has no {count} free ids left; convert it to a wider dtype")
    return np.asarray(found, dtype=labels.dtype)


def next_free_id(labels: np.ndarray) -> int:
    """The id to paint a new object with: the largest id plus one (or the smallest unused id
    when that would overflow the dtype).

    Parameters
    ----------
    labels : ndarray of int, any shape (a whole stack may be passed)

    Returns
    -------
    int
    """
    return int(free_ids(labels, 1)[0])


def rasterize_path(path: np.ndarray, shape: tuple[int, int], closed: bool = False) -> np.ndarray:
    """Pixels on a polyline (8-connected Bresenham segments between rounded vertices).

    A one-pixel 8-connected line is enough to cut a region into 4-connected pieces.

    Parameters
    ----------
    path : array-like of float, shape ``(N, 2)``, N >= 2
        ``(row, col)`` vertices; they may lie outside the image.
    shape : tuple of int ``(H, W)``
    closed : bool
        Join the last vertex back to the first (polygons, rectangles).

    Returns
    -------
    ndarray of bool, shape ``(H, W)``
    """
    path = np.asarray(path, dtype=float)
    if path.ndim != 2 or path.shape[1] != 2 or len(path) < 2:
        raise ValueError(f"A cut line needs at least two (row, col) vertices, got an array of shape {path.shape}")
    if not np.isfinite(path).all():
        raise ValueError("Cut line vertices must be finite")
    vertices = np.rint(path).astype(np.int64)
    if closed:
        vertices = np.vstack([vertices, vertices[:1]])
    mask = np.zeros(shape, dtype=bool)
    for (r0, c0), (r1, c1) in zip(vertices[:-1], vertices[1:]):
        rows, cols = draw_line(int(r0), int(c0), int(r1), int(c1))
        inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        mask[rows[inside], cols[inside]] = True
    return mask


# Binary morphology with the disk ``x**2 + y**2 <= r**2`` (``skimage.morphology.disk(r)``).
# Pixels beyond the array count as foreground for an erosion and as background for a dilation,
# so an object touching the image border is treated as continuing past it.
@functools.lru_cache(maxsize=16)
def _disk(radius: int) -> np.ndarray:
    return disk(radius).astype(bool)


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    return ndi.binary_erosion(mask, structure=_disk(int(radius)), border_value=1)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    return ndi.binary_dilation(mask, structure=_disk(int(radius)), border_value=0)


def _open(mask: np.ndarray, radius: int) -> np.ndarray:
    return _dilate(_erode(mask, radius), radius)


def _close(mask: np.ndarray, radius: int) -> np.ndarray:
    return _erode(_dilate(mask, radius), radius)


def _all_but_largest(pieces: np.ndarray, count: int) -> list[int]:
    """Pieces 1..count except the largest (the first largest on a tie), in label order."""
    largest = int(np.argmax(np.bincount(pieces.ravel(), minlength=count + 1)[1:])) + 1
    return [p for p in range(1, count + 1) if p != largest]


# -- operations ---------------------------------------------------------------------------------
def delete_labels(labels: np.ndarray, ids: Iterable[int] | int) -> np.ndarray:
    """Set the given objects to background.

    Parameters
    ----------
    labels : ndarray of int, shape ``(H, W)``
    ids : int or iterable of int
        Positive ids; ids that are not present are ignored.

    Returns
    -------
    ndarray, same shape and dtype.
    """
    labels = _check_labels(labels)
    ids = _check_ids(ids, labels)
    return np.where(np.isin(labels, ids), labels.dtype.type(0), labels)


def merge_labels(labels: np.ndarray, ids: Iterable[int]) -> np.ndarray:
    """Merge objects into one, which keeps the first id given.

    The objects need not touch (a gland cut in two by the section stays one object).

    Parameters
    ----------
    labels : ndarray of int, shape ``(H, W)``
    ids : iterable of int
        At least two distinct positive ids; the result has ``ids[0]``.

    Returns
    -------
    ndarray, same shape and dtype.
    """
    labels = _check_labels(labels)
    ids = _check_ids(ids, labels)
    if ids.size < 2:
        raise ValueError(f"Merging needs at least two distinct ids, got {ids.tolist()}")
    return np.where(np.isin(labels, ids[1:]), ids[0], labels)


def split_along_line(
    labels: np.ndarray, path: np.ndarray, closed: bool = False, start_id: int | None = None
) -> np.ndarray:
    """Cut every object that a drawn line crosses from side to side.

    The line is rasterised (:func:`rasterize_path`) and each object it touches is split into the
    4-connected pieces left after removing the line. In each connected part that was cut, the
    largest piece keeps the id (the first in scan order on a tie) and the other pieces get new
    ids, in scan order. A line pixel goes to the nearest piece, and to the piece that keeps the id
    when it is as near. Objects the line only nicks stay as they are.

    Parameters
    ----------
    labels : ndarray of int, shape ``(H, W)``
    path : array-like of float, shape ``(N, 2)``
        ``(row, col)`` vertices in pixel coordinates.
    closed : bool
        Treat the path as a closed polygon (cuts the inside from the outside).
    start_id : int, optional
        First new id (then ``start_id + 1``, ...); default :func:`free_ids`.

    Returns
    -------
    ndarray, same shape and dtype.

    Raises
    ------
    ValueError
        If the line cuts no object into pieces.
    """
    labels = _check_labels(labels)
    cut = rasterize_path(path, labels.shape, closed)
    crossed = np.unique(labels[cut])
    crossed = crossed[crossed > 0]
    plans = []  # (id, box, object mask, owning piece of each pixel, pieces that get new ids)
    for index in crossed.tolist():
        box = _bbox(labels == index)
        mask = labels[box] == index
        pieces, n_pieces = ndi.label(mask & ~cut[box], structure=_FOUR_CONNECTED)
        if n_pieces < 2:
            continue
        parts, n_parts = ndi.label(mask, structure=_FOUR_CONNECTED)
        renamed = []
        for part in range(1, n_parts + 1):
            in_part = np.unique(pieces[(parts == part) & (pieces > 0)])
            if in_part.size < 2:
                continue
            sizes = np.bincount(pieces[parts == part], minlength=n_pieces + 1)[in_part]
            largest = in_part[int(np.argmax(sizes))]
            renamed.extend(int(p) for p in in_part if p != largest)
        if not renamed:
            continue
        # The object's line pixels join the nearest piece; on a tie, the piece that keeps the id.
        is_renamed = np.isin(pieces, renamed)
        to_kept = ndi.distance_transform_edt(~((pieces > 0) & ~is_renamed))
        to_renamed, (near_r, near_c) = ndi.distance_transform_edt(~is_renamed, return_indices=True)
        owner = np.where(to_renamed < to_kept, pieces[near_r, near_c], 0)
        owner = np.where(pieces > 0, pieces, owner)
        plans.append((index, box, mask, owner, sorted(renamed)))
    if not plans:
        raise ValueError(
            "The line does not cut any object into pieces; draw it across the object, from background to background"
        )
    new = iter(free_ids(labels, sum(len(p[4]) for p in plans), start_id).tolist())
    out = labels.copy()
    for _, box, mask, owner, renamed in plans:
        region = out[box]
        for piece in renamed:
            region[mask & (owner == piece)] = next(new)
    return out


def split_by_seeds(labels: np.ndarray, seeds: np.ndarray, start_id: int | None = None) -> np.ndarray:
    """Split objects by a watershed of their distance map from clicked seed points.

    Every object holding two or more distinct seed pixels is divided into one region per seed
    (watershed of the negated Euclidean distance to the object's outline, restricted to the
    object). The largest region keeps the id, the others get new ids in seed order. Parts of the
    object the watershed cannot reach (separate fragments without a seed) keep the id. Seeds on
    background, outside the image, or alone in their object are ignored.

    Parameters
    ----------
    labels : ndarray of int, shape ``(H, W)``
    seeds : array-like of float, shape ``(N, 2)``
        ``(row, col)`` seed positions, rounded to the nearest pixel.
    start_id : int, optional
        First new id; default :func:`free_ids`.

    Returns
    -------
    ndarray, same shape and dtype.

    Raises
    ------
    ValueError
        If no object holds at least two seeds.
    """
    labels = _check_labels(labels)
    seeds = np.asarray(seeds, dtype=float)
    if seeds.size == 0:
        seeds = np.zeros((0, 2))
    if seeds.ndim != 2 or seeds.shape[1] != 2:
        raise ValueError(f"Seeds must be (row, col) points, an array of shape (N, 2); got shape {seeds.shape}")
    if not np.isfinite(seeds).all():
        raise ValueError("Seed positions must be finite")
    pixels = np.rint(seeds).astype(np.int64)
    inside = (pixels >= 0).all(axis=1) & (pixels[:, 0] < labels.shape[0]) & (pixels[:, 1] < labels.shape[1])
    pixels = pixels[inside]
    _, first = np.unique(pixels, axis=0, return_index=True)
    pixels = pixels[np.sort(first)]  # distinct, in the order given
    by_object: dict[int, list[tuple[int, int]]] = {}
    for r, c in pixels.tolist():
        index = int(labels[r, c])
        if index:
            by_object.setdefault(index, []).append((r, c))
    plans = []
    for index, points in by_object.items():
        if len(points) < 2:
            continue
        box = _bbox(labels == index)
        mask = labels[box] == index
        markers = np.zeros(mask.shape, dtype=np.int32)
        for k, (r, c) in enumerate(points, start=1):
            markers[r - box[0].start, c - box[1].start] = k
        distance = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        regions = watershed(-distance, markers, mask=mask)
        renamed = _all_but_largest(regions, len(points))
        plans.append((box, regions, renamed))
    if not plans:
        raise ValueError("Put at least two seed points inside the object to split")
    new = iter(free_ids(labels, sum(len(p[2]) for p in plans), start_id).tolist())
    out = labels.copy()
    for box, regions, renamed in plans:
        region = out[box]
        for k in renamed:
            region[regions == k] = next(new)
    return out


def fill_holes(labels: np.ndarray, ids: Iterable[int] | None = None) -> np.ndarray:
    """Fill the background holes of each object (never over another object).

    Uses :func:`glas_seg.backend.postprocess.fill_holes_per_object`, on compacted ids when the
    ids are large and sparse.

    Parameters
    ----------
    labels : ndarray of int, shape ``(H, W)``
    ids : iterable of int, optional
        Only fill these objects; default all.

    Returns
    -------
    ndarray, same shape and dtype.
    """
    labels = _check_labels(labels)
    if ids is not None:  # each object on its own crop, as a one-object label image
        out = labels.copy()
        for index in _check_ids(ids, labels).tolist():
            box = _bbox(labels == index)
            if box is None:
                continue
            crop = labels[box]
            filled = fill_holes_per_object((crop == index).astype(np.uint8)) == 1
            out[box][filled & (crop == 0)] = index
        return out
    if _is_dense(labels):
        return fill_holes_per_object(labels.astype(np.intp, copy=False)).astype(labels.dtype, copy=False)
    values, index, _ = compact_ids(labels)
    return np.concatenate([np.zeros(1, labels.dtype), values])[fill_holes_per_object(index)]


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set objects with fewer than ``min_size`` pixels to background (debris clean-up).

    Parameters
    ----------
    labels : ndarray of int, shape ``(H, W)``
    min_size : int
        Objects of exactly ``min_size`` pixels are kept.

    Returns
    -------
    ndarray, same shape and dtype.
    """
    labels = _check_labels(labels)
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    return remove_small_labels(labels, int(min_size))


def smooth_labels(labels: np.ndarray, radius: int, ids: Iterable[int] | None = None) -> np.ndarray:
    """Smooth object outlines: a binary opening then closing of each object with a disk
    (the footprint ``skimage.morphology.disk(radius)``).

    Each object is processed on its own crop, so neighbours are never merged: the closing only
    claims pixels that were background, and a pixel wanted by two objects goes to the lower id.
    The image border is treated as if the object continued beyond it. An object the opening
    would erase entirely (smaller than the disk) is left unchanged. The opening may cut thin
    bridges; the pieces keep the id.

    Parameters
    ----------
    labels : ndarray of int, shape ``(H, W)``
    radius : int
        Disk radius in pixels; 0 returns a copy.
    ids : iterable of int, optional
        Only smooth these objects; default all.

    Returns
    -------
    ndarray, same shape and dtype.
    """
    labels = _check_labels(labels)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    out = labels.copy()
    if radius == 0:
        return out
    margin = int(radius) + 1
    if ids is None:
        boxes = _object_boxes(labels)
    else:
        wanted = _check_ids(ids, labels).tolist()
        boxes = [(index, _bbox(labels == index)) for index in sorted(wanted)]
        boxes = [(index, box) for index, box in boxes if box is not None]
    diameter = 2 * int(radius) + 1
    for index, box in boxes:
        if any(s.stop - s.start < diameter for s in box):
            continue  # no disk fits inside: the opening would erase it, so it is left unchanged
        box = _grow(box, margin, labels.shape)
        original = labels[box]
        mask = original == index
        padded = np.pad(mask, margin, mode="edge")
        smooth = _close(_open(padded, radius), radius)[margin:-margin, margin:-margin]
        if not smooth.any():
            continue
        region = out[box]
        region[mask & ~smooth] = 0
        region[smooth & ~mask & (original == 0) & (region == 0)] = index
    return out


def relabel_sequentially(labels: np.ndarray) -> np.ndarray:
    """Renumber the objects 1..K keeping their order (0 stays background).

    Parameters
    ----------
    labels : ndarray of int, shape ``(H, W)``

    Returns
    -------
    ndarray, same shape and dtype.
    """
    labels = _check_labels(labels)
    if labels.size == 0:
        return labels.copy()
    if _is_dense(labels):
        flat = labels.astype(np.intp, copy=False)
        present = np.bincount(flat.ravel()) > 0
        present[0] = False
        table = np.cumsum(present).astype(labels.dtype)
        return table[flat]
    return compact_ids(labels)[1].astype(labels.dtype)
