"""Editing a region of a slide's label store in memory, and writing it back.

A label store (written by :func:`.slide_segment.segment_slide`) is far too large to edit whole.
:func:`read_labels_region` reads one box of its base level into an ordinary array, which any
editing tool may change (napari's brush, :mod:`.editing`); :func:`write_labels_region` writes it
back: only the pixels inside the box change on level 0, the display levels are recomputed only
where the box falls, and the manifest's table of objects (area, box) is brought up to date for
the objects the edit touched. Boxes are ``(y0, y1, x0, x1)`` in base-level pixels of the store
(the segmented region: slide pixels less the store's ``origin``), end-exclusive.

Ids. An id that was in the region before keeps meaning the same object (it may reach beyond
the box). An id new to the region keeps its number unless that number belongs to an object
elsewhere in the store, or is at or above the manifest's ``next_id`` (the store reserves those
for a resumed segmentation): such an id gets a fresh number from ``next_id``.

Crashes. A write changes level 0, then the display levels, then the manifest. Before the first
array write the old labels of the box go to an undo journal (:data:`JOURNAL`, written
atomically) and the manifest then records the write's token; the journal is deleted last. A
process killed in between leaves the journal, and the next opening of the store
(:func:`.slide_segment.open_labels`, a read, a write) finishes the job: when the manifest holds
the token the write was complete, else the old labels are put back; a write that fails with an
ordinary error puts them back at once. So a store holds either the labels before an edit or after
it, never half of it. A write holds a lock file (:data:`LOCK`, ``filelock``) that other processes
respect too: a reader that finds the journal of a write still under way (in another thread or
process) leaves it alone.

Concurrency. Writes in one process are serialised; with ``base`` (the labels as read, or their
:func:`labels_digest`) a write refuses when the store's region no longer holds them (another
editor or a new segmentation wrote there since), instead of overwriting their work.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .checkpoint import atomic_write
from .errors import GlasSegError
from .slide_segment import MANIFEST, _write_manifest, open_labels
from .stacks import fingerprint

__all__ = ["MAX_EDIT_PIXELS", "RegionWrite", "clip_box", "labels_digest", "read_labels_region",
           "write_labels_region", "finish_interrupted_write"]

#: Largest region opened for editing (or scored), in base-level pixels: 64 MP of uint32 labels
#: are 256 MB in memory, plus napari's copy while painting. Zoom in or draw a smaller region.
MAX_EDIT_PIXELS = 64_000_000

#: Undo journal of a write in progress, in the store folder (see the module docstring).
JOURNAL = "pending_write.npz"
#: Lock file held by a write or a recovery, across threads and processes (``filelock``).
LOCK = ".write.lock"
#: How long a write waits for another one to finish before giving up, in seconds.
LOCK_TIMEOUT = 120

_WRITE_LOCK = threading.Lock()  # writes of this process wait for each other here, not on the lock file


@dataclass
class RegionWrite:
    """What :func:`write_labels_region` did.

    changed : int
        Base-level pixels whose id changed (0: the region already held these labels; nothing written).
    renamed : dict
        Id given -> id written, for ids new to the region that needed a fresh number.
    removed : list
        Ids gone from the whole store (they lay only in the region and were deleted).
    labels : ndarray
        The labels as written (``renamed`` applied): what the region now holds.
    """

    changed: int
    renamed: dict = field(default_factory=dict)
    removed: list = field(default_factory=list)
    labels: np.ndarray | None = None


def labels_digest(labels: np.ndarray) -> str:
    """A content hash of a region's labels, to pass as ``base`` instead of a copy of them."""
    return fingerprint(np.asarray(labels, dtype=np.uint32))


def clip_box(shape: tuple[int, int], box) -> tuple[int, int, int, int]:
    """``box = (y0, y1, x0, x1)`` clipped to an array of ``shape``; GlasSegError when it is not four
    integers, is empty, or lies outside."""
    try:
        y0, y1, x0, x1 = (int(v) for v in box)
    except (TypeError, ValueError):
        raise GlasSegError(f"a region box must be 4 integers y0, y1, x0, x1, not {box!r}") from None
    if y1 <= y0 or x1 <= x0:
        raise GlasSegError(f"region box {[y0, y1, x0, x1]} is empty (y1 and x1 must exceed y0 and x0)")
    H, W = (int(n) for n in shape)
    cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
    if cy1 <= cy0 or cx1 <= cx0:
        raise GlasSegError(f"region box {[y0, y1, x0, x1]} lies outside the labels ({H} x {W} px)")
    return cy0, cy1, cx0, cx1


def _check_size(box, max_pixels: int | None) -> None:
    y0, y1, x0, x1 = box
    if max_pixels is not None and (y1 - y0) * (x1 - x0) > max_pixels:
        raise GlasSegError(f"the region is {(y1 - y0) * (x1 - x0) / 1e6:.0f} MP, more than the "
                           f"{max_pixels / 1e6:.0f} MP that can be edited at once; zoom in or draw a smaller region")


def read_labels_region(store: str | Path, box, *, max_pixels: int | None = MAX_EDIT_PIXELS) -> np.ndarray:
    """The base-level labels of a store inside ``box`` (clipped to the store), as a uint32 array.

    Parameters
    ----------
    store : path
        A zarr label store written by :func:`.slide_segment.segment_slide`.
    box : (y0, y1, x0, x1)
        Base-level pixels of the store; clipped to it (use :func:`clip_box` to know the result).
    max_pixels : int, optional
        Refuse a larger region (default :data:`MAX_EDIT_PIXELS`; None: no limit).
    """
    level0 = _open_level0(store)
    y0, y1, x0, x1 = clip_box(level0.shape, box)
    _check_size((y0, y1, x0, x1), max_pixels)
    return np.asarray(level0[y0:y1, x0:x1], dtype=np.uint32)


def _check_store(store: Path) -> None:
    if not (store / MANIFEST).is_file():
        raise GlasSegError(f"{store} is not a glas-seg label store (no {MANIFEST})")


def _open_level0(store):
    """Level 0 of a store, read-only (an interrupted write finished first, by :func:`open_labels`)."""
    store = Path(store)
    _check_store(store)
    return open_labels(store)[0]


def _check_new_labels(labels, shape) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != tuple(shape):
        raise GlasSegError(f"the edited labels have shape {labels.shape} but the region is {shape[0]} x {shape[1]} px")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise GlasSegError(f"labels must be integers, not {labels.dtype}")
    if labels.size and labels.dtype.kind == "i" and labels.min() < 0:
        raise GlasSegError(f"labels hold negative ids (min {int(labels.min())}); ids must be 0 or more")
    if labels.size and int(labels.max()) > np.iinfo(np.uint32).max:
        raise GlasSegError(f"id {int(labels.max())} does not fit the store's uint32 labels")
    return labels.astype(np.uint32, copy=False)


def write_labels_region(store: str | Path, box, labels: np.ndarray, *, base=None) -> RegionWrite:
    """Write edited labels of ``box`` back into a label store.

    Parameters
    ----------
    store : path
        A zarr label store written by :func:`.slide_segment.segment_slide`.
    box : (y0, y1, x0, x1)
        Where ``labels`` lie, in base-level pixels of the store; must lie inside it (no clipping).
    labels : int ndarray ``(y1 - y0, x1 - x0)``
        The edited region (non-negative ids).
    base : ndarray or str, optional
        The region's labels as they were read (or their :func:`labels_digest`). When the store's
        region holds anything else now, GlasSegError is raised and nothing is written.

    Returns
    -------
    RegionWrite

    Notes
    -----
    Level 0 is written in one assignment of the box, then the display levels over the box, then
    the manifest (atomically, last). A store whose segmentation has not finished
    (``manifest["complete"]`` false) is refused: the running segmentation would overwrite the table.
    """
    from filelock import FileLock, Timeout

    store = Path(store)
    _check_store(store)
    try:
        with _WRITE_LOCK, FileLock(store / LOCK, timeout=LOCK_TIMEOUT):
            _finish_locked(store)
            return _write_locked(store, box, labels, base)
    except Timeout:
        raise GlasSegError(f"another write into {store.name} has held it for {LOCK_TIMEOUT} s; nothing was written: "
                           "try again when it has finished") from None


def _write_locked(store: Path, box, labels, base) -> RegionWrite:
    """:func:`write_labels_region` with the store's locks held."""
    import zarr

    group = zarr.open_group(str(store), mode="a")
    level0 = group["0"]
    H, W = level0.shape
    try:
        y0, y1, x0, x1 = (int(v) for v in box)
    except (TypeError, ValueError):
        raise GlasSegError(f"a region box must be 4 integers y0, y1, x0, x1, not {box!r}") from None
    if not (0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W):
        raise GlasSegError(f"region box {[y0, y1, x0, x1]} must lie inside the labels ({H} x {W} px)")
    new = _check_new_labels(labels, (y1 - y0, x1 - x0))
    current = np.asarray(level0[y0:y1, x0:x1], dtype=np.uint32)
    if base is not None:
        unchanged = (base == labels_digest(current) if isinstance(base, str)
                     else np.asarray(base).shape == current.shape and np.array_equal(np.asarray(base), current))
        if not unchanged:
            raise GlasSegError("the labels of this region changed on disk since it was opened (another edit or "
                               "a new segmentation wrote there); nothing was written: open the region again and "
                               "redo the edit")
    manifest = json.loads((store / MANIFEST).read_text())
    if not manifest.get("complete", False):
        # segment_slide keeps its own table and next id in memory and would overwrite ours.
        raise GlasSegError("this slide's segmentation has not finished (it is running, or was interrupted): "
                           "let it finish or resume it, then edit; nothing was written")
    objects = {int(k): v for k, v in manifest.get("objects", {}).items()}
    next_id = int(manifest.get("next_id", 1))

    before_ids, before_counts = _id_counts(current)
    # Ids new to the region that name an object elsewhere, or reserved ones: fresh numbers.
    was_there = set(before_ids.tolist())
    fresh = [i for i in _id_counts(new)[0].tolist() if i and i not in was_there and (i in objects or i >= next_id)]
    renamed = {}
    if fresh:  # sorted (_id_counts), so searchsorted finds each one's new number
        if next_id + len(fresh) - 1 > np.iinfo(np.uint32).max:
            raise GlasSegError("the store has no free ids left for the new objects")
        renamed = {old: next_id + k for k, old in enumerate(fresh)}
        next_id += len(fresh)
        old_ids = np.array(fresh, np.uint32)
        hit = np.isin(new, old_ids)
        new = new.copy()
        new[hit] = np.searchsorted(old_ids, new[hit]).astype(np.uint32) + np.uint32(renamed[fresh[0]])
    changed = int(np.count_nonzero(new != current))
    if not changed:
        return RegionWrite(0, {}, [], current)

    # The table first (it reads level 0 only outside the box), then the arrays, the manifest
    # last: an error in the bookkeeping leaves the store as it was.
    after_ids, after_counts = _id_counts(new)
    inside_before = dict(zip(before_ids.tolist(), before_counts.tolist()))
    inside_after = dict(zip(after_ids.tolist(), after_counts.tolist()))
    touched = sorted((set(inside_before) | set(inside_after)) - {0})
    boxes = ndi.find_objects(new) if after_ids.size and after_ids[-1] > 0 else []
    removed = []
    for index in touched:
        entry = objects.get(index)
        if index in inside_after:
            s = boxes[index - 1]
            inner = [y0 + s[0].start, x0 + s[1].start, y0 + s[0].stop, x0 + s[1].stop]
        else:
            inner = None
        old_box = entry.get("box") if entry else None
        if old_box is not None and not _inside(old_box, (y0, y1, x0, x1)):
            # The object reaches beyond the region: count its pixels outside, within its old box.
            outer_area, outer = _outside_part(level0, index, old_box, (y0, y1, x0, x1))
        else:
            outer_area, outer = 0, None
        area = outer_area + inside_after.get(index, 0)
        if area == 0:
            if index in objects:
                del objects[index]
            removed.append(index)
            continue
        found = [b for b in (inner, outer) if b is not None]
        merged = [min(b[0] for b in found), min(b[1] for b in found), max(b[2] for b in found),
                  max(b[3] for b in found)]
        if entry is None:
            entry = objects[index] = {"area": 0, "box": None, "p": [0.0, 0]}
        entry["area"], entry["box"] = int(area), [int(v) for v in merged]
    token = uuid.uuid4().hex
    atomic_write(store / JOURNAL, lambda tmp: _save_journal(tmp, (y0, y1, x0, x1), current, token))
    try:
        _paint(group, (y0, y1, x0, x1), new)
        manifest.update(next_id=next_id, objects={str(k): v for k, v in sorted(objects.items())}, write=token)
        _write_manifest(store, manifest)
    except Exception:
        _finish_locked(store)  # a full disk, say: the old labels back now, not at the next opening
        raise
    (store / JOURNAL).unlink(missing_ok=True)
    return RegionWrite(changed, renamed, removed, new)


def _paint(group, box, labels: np.ndarray) -> None:
    """Put ``labels`` into level 0 of a store's group at ``box`` and recompute the display levels there."""
    y0, y1, x0, x1 = box
    group["0"][y0:y1, x0:x1] = labels
    levels = int(group.attrs.get("levels", 1))
    for k in range(1, levels):  # level k is level 0 taken every 2**k pixels
        if str(k) not in group:
            break
        step = 2**k
        r0, r1 = -(-y0 // step), -(-y1 // step)
        c0, c1 = -(-x0 // step), -(-x1 // step)
        if r1 > r0 and c1 > c0:
            group[str(k)][r0:r1, c0:c1] = labels[r0 * step - y0 :: step, c0 * step - x0 :: step][: r1 - r0, : c1 - c0]


def _save_journal(path, box, old: np.ndarray, token: str) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to a temporary name
        np.savez(f, box=np.asarray(box, np.int64), old=old, token=np.asarray(token))


def finish_interrupted_write(store: str | Path) -> str | None:
    """Complete or undo a write that a killed process left half done (see the module docstring).

    Returns
    -------
    str or None
        ``"completed"`` (the manifest had been written: only the journal was left),
        ``"undone"`` (the box's old labels were put back) or None (no interrupted write).

    Raises
    ------
    GlasSegError
        The journal cannot be read, or the store cannot be written to put the old labels back.
    """
    from filelock import FileLock, Timeout

    store = Path(store)
    if not (store / JOURNAL).is_file():
        return None
    try:
        with FileLock(store / LOCK, timeout=0):
            return _finish_locked(store)
    except Timeout:  # a write under way (this process's worker thread, or another process): not interrupted
        return None
    except OSError as exc:  # the lock file cannot be made: a read-only store
        raise _unfinished(store, exc) from None


def _finish_locked(store: Path) -> str | None:
    """:func:`finish_interrupted_write` with the store's lock held."""
    import zarr

    journal = store / JOURNAL
    if not journal.is_file():
        return None
    try:
        with np.load(journal, allow_pickle=False) as saved:
            box, old, token = tuple(int(v) for v in saved["box"]), saved["old"], str(saved["token"])
        manifest = json.loads((store / MANIFEST).read_text())
        if manifest.get("write") == token:
            outcome = "completed"
        else:
            _paint(zarr.open_group(str(store), mode="a"), box, old)
            outcome = "undone"
        journal.unlink()
    except (OSError, ValueError, KeyError) as exc:
        raise _unfinished(store, exc) from None
    return outcome


def _unfinished(store: Path, exc: Exception) -> GlasSegError:
    return GlasSegError(f"{store} holds an interrupted label edit ({JOURNAL}) that could not be finished "
                        f"({type(exc).__name__}: {exc}); the store may be read-only")


def _id_counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ids present in ``labels`` (0 included when present) and their pixel counts: a
    bincount when the ids are small enough (several times faster than ``np.unique``'s sort)."""
    top = int(labels.max()) if labels.size else 0
    if top >= 1 << 22:
        return np.unique(labels, return_counts=True)
    counts = np.bincount(labels.ravel(), minlength=top + 1)
    ids = np.flatnonzero(counts)
    return ids, counts[ids]


def _inside(box, region) -> bool:
    """Whether an object box ``[y0, x0, y1, x1]`` lies inside ``region = (y0, y1, x0, x1)``."""
    y0, y1, x0, x1 = region
    return y0 <= box[0] and x0 <= box[1] and box[2] <= y1 and box[3] <= x1


def _outside_part(level0, index: int, box, region) -> tuple[int, list | None]:
    """Pixels and bounding box of object ``index`` in its old box ``[y0, x0, y1, x1]`` but outside
    ``region`` (read from the store: the outside did not change)."""
    by0, bx0, by1, bx1 = (int(v) for v in box)
    window = np.asarray(level0[by0:by1, bx0:bx1]) == index
    y0, y1, x0, x1 = region
    window[max(y0 - by0, 0) : max(y1 - by0, 0), max(x0 - bx0, 0) : max(x1 - bx0, 0)] = False
    area = int(np.count_nonzero(window))
    if not area:
        return 0, None
    rows, cols = np.nonzero(window.any(1))[0], np.nonzero(window.any(0))[0]
    return area, [by0 + int(rows[0]), bx0 + int(cols[0]), by0 + int(rows[-1]) + 1, bx0 + int(cols[-1]) + 1]


