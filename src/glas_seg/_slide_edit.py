"""Slides in napari: a region of a slide's labels opened for editing, written back, and scored.

A slide's labels are a lazy multiscale layer read from an on-disk store (role
:data:`._slide_widget.SLIDE_SEGMENTATION`); they are never edited in place. *Edit region* reads
the visible field or the box of a Shapes layer from the store into an ordinary in-memory Labels
layer (role :data:`SLIDE_REGION_EDIT`), placed exactly over the slide, which every Edit tool and
napari's brush accept. *Write back* hands it to :func:`.backend.slide_edit.write_labels_region`
(only the region changes in the store; a store changed by someone else since is refused) and
refreshes the slide's labels layer. Nothing is written without that click.

:func:`region_crops` crops a prediction and a ground truth of the same slide to their common
part of a region, through world coordinates, for the Metrics widget.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from napari.layers import Labels

from ._layers import METADATA_KEY, role
from ._slide_widget import SLIDE_SEGMENTATION, WHOLE, slide_region
from .backend.errors import GlasSegError
from .backend.slide_edit import MAX_EDIT_PIXELS, clip_box, labels_digest, read_labels_region, write_labels_region

#: Role of an in-memory Labels layer holding one region of a slide's labels, to be written back.
SLIDE_REGION_EDIT = "slide region edit"
#: Layers that hold (part of) a slide's labels.
SLIDE_ROLES = (SLIDE_SEGMENTATION, SLIDE_REGION_EDIT)


def slide_labels_layers(viewer) -> list:
    """The lazy label layers of segmented slides in the viewer, bottom to top."""
    return [layer for layer in viewer.layers if isinstance(layer, Labels) and role(layer) == SLIDE_SEGMENTATION]


def _meta(layer) -> dict:
    return layer.metadata[METADATA_KEY]


def open_region(viewer, labels_layer: Labels, choice: str, name: str | None = None) -> Labels:
    """Add an in-memory Labels layer with the region ``choice`` (visible field or Shapes box) of
    a slide labels layer, placed over it. GlasSegError for no region or one over
    :data:`.backend.slide_edit.MAX_EDIT_PIXELS`."""
    if role(labels_layer) != SLIDE_SEGMENTATION:
        raise GlasSegError(f"{labels_layer.name!r} is not the labels of a segmented slide; segment a slide first")
    if choice == WHOLE:
        raise GlasSegError("choose the visible field or a Shapes region to edit, not the whole slide")
    store = _meta(labels_layer)["store"]
    x, y, w, h = slide_region(viewer, labels_layer, choice)  # store pixels: the layer's level 0
    box = (y, y + h, x, x + w)
    labels = read_labels_region(store, box)  # refuses more than MAX_EDIT_PIXELS
    scale = np.asarray(labels_layer.scale[-2:], float)
    translate = np.asarray(labels_layer.translate[-2:], float) + np.asarray([y, x], float) * scale
    meta = {METADATA_KEY: {"role": SLIDE_REGION_EDIT, "store": store, "box": list(box),
                           "base": labels_digest(labels), "source": labels_layer.name}}
    return viewer.add_labels(labels, name=name or f"{labels_layer.name} region", scale=scale, translate=translate,
                             units=tuple(labels_layer.units[-2:]), metadata=meta)


@dataclass
class WriteBack:
    """What :func:`write_back` did: the backend's :class:`~.backend.slide_edit.RegionWrite` and the
    slide labels layers refreshed."""

    result: object
    refreshed: list


def write_back(viewer, region_layer: Labels) -> WriteBack:
    """Write a region layer into its store and show the result in the slide's labels layer.

    Ids renumbered by the store (an id of another object elsewhere, see
    :func:`.backend.slide_edit.write_labels_region`) are renumbered in the layer too, and the
    layer then counts as freshly read (a second write-back without edits writes nothing). The
    Edit widget runs the same two steps with the write in a worker thread.
    """
    return finish_write_back(viewer, region_layer, *write_back_job(region_layer)())


def write_back_job(region_layer: Labels) -> Callable[[], tuple]:
    """Check a region layer and take its labels (main thread): a function that writes them into
    the store, for any thread, and returns the backend's result and the new digest for
    :func:`finish_write_back`. GlasSegError when the layer is not a slide region."""
    if role(region_layer) != SLIDE_REGION_EDIT:
        raise GlasSegError(f"{region_layer.name!r} is not a slide region; open one with Edit region first")
    meta = _meta(region_layer)
    store, box, base = meta["store"], meta["box"], meta["base"]
    labels = np.array(region_layer.data)  # a copy: the layer may be painted again while this writes

    def job() -> tuple:
        result = write_labels_region(store, box, labels, base=base)
        return result, labels_digest(result.labels)

    return job


def finish_write_back(viewer, region_layer: Labels, result, digest: str) -> WriteBack:
    """Show a finished write (main thread): renumbered ids in the layer, the slide's labels re-read."""
    meta = _meta(region_layer)
    if result.renamed:
        region_layer.data = result.labels
    meta["base"] = digest
    refreshed = refresh_slide_labels(viewer, meta["store"]) if result.changed else []
    return WriteBack(result, refreshed)


def refresh_slide_labels(viewer, store: str) -> list:
    """Re-read the lazy labels layers of ``store``: new dask arrays (new names, so no block cached
    by napari's dask cache is shown again), then ``layer.refresh()``."""
    import dask.array as da

    from .backend.slide_segment import open_labels

    layers = [layer for layer in slide_labels_layers(viewer) if _meta(layer).get("store") == str(store)]
    if not layers:
        return []
    token = uuid.uuid4().hex[:8]
    levels = [da.from_zarr(array, name=f"glas-seg-labels-{token}-{i}") for i, array in enumerate(open_labels(store))]
    for layer in layers:
        layer.data = levels if layer.multiscale else levels[0]
        layer.refresh()
    return layers


@dataclass
class RegionCrops:
    """A prediction and a ground truth cut to the same pixels (lazy where the layers are)."""

    pred: object
    gt: object
    pred_translate: np.ndarray
    gt_translate: np.ndarray
    shape: tuple[int, int]
    note: str


def is_slide_pair(pred: Labels, gt: Labels) -> bool:
    """Whether scoring ``pred`` against ``gt`` is scoring a slide region (one of them is a slide's
    labels, a region of them, or a multiscale layer)."""
    return any(layer.multiscale or role(layer) in SLIDE_ROLES for layer in (pred, gt))


def _level0(layer):
    return layer.data[0] if layer.multiscale else layer.data


def region_crops(viewer, pred: Labels, gt: Labels, choice: str) -> RegionCrops:
    """Cut ``pred`` and ``gt`` to their common pixels in a region, matched in world coordinates.

    The region is the whole of ``pred`` (a region layer, any in-memory layer), or for a
    multiscale ``pred`` (a slide's labels) the ``choice`` of :func:`._slide_widget.slide_region`.
    Both layers must be 2D with the same pixel size, on the same pixel grid.
    """
    for layer in (pred, gt):
        if layer.ndim != 2:
            raise GlasSegError(f"metrics on a slide region need 2D Labels layers; {layer.name!r} has {layer.ndim} axes")
    p0, g0 = _level0(pred), _level0(gt)
    if pred.multiscale:
        region = slide_region(viewer, pred, choice)
        x, y, w, h = region if region is not None else (0, 0, p0.shape[1], p0.shape[0])
    else:
        x, y, w, h = 0, 0, p0.shape[1], p0.shape[0]
    ps, gs = np.asarray(pred.scale[-2:], float), np.asarray(gt.scale[-2:], float)
    if not np.allclose(ps, gs, rtol=1e-3):
        raise GlasSegError(f"{pred.name!r} and {gt.name!r} have different pixel sizes ({ps.tolist()} and "
                           f"{gs.tolist()}); both must be labels of the same slide")
    offset = (np.asarray(pred.translate[-2:], float) - np.asarray(gt.translate[-2:], float)) / gs
    if not np.allclose(offset, np.round(offset), atol=0.05):
        raise GlasSegError(f"{pred.name!r} and {gt.name!r} are not on the same pixel grid (offset "
                           f"{offset.round(2).tolist()} px); both must be labels of the same slide")
    oy, ox = (int(v) for v in np.round(offset))
    # The region in ground-truth pixels, cut to the ground truth.
    try:
        gy0, gy1, gx0, gx1 = clip_box(g0.shape, (y + oy, y + h + oy, x + ox, x + w + ox))
    except GlasSegError:
        where = " in the chosen region" if pred.multiscale else ""
        raise GlasSegError(f"{pred.name!r} and {gt.name!r} do not overlap{where}: the ground truth must cover "
                           "the region (same slide, same place)") from None
    size = (gy1 - gy0) * (gx1 - gx0)
    if size > MAX_EDIT_PIXELS:
        raise GlasSegError(f"the region is {size / 1e6:.0f} MP, more than the {MAX_EDIT_PIXELS / 1e6:.0f} MP "
                           "scored at once; zoom in or draw a smaller region")
    py0, px0 = gy0 - oy, gx0 - ox
    pred_crop = p0[py0 : py0 + gy1 - gy0, px0 : px0 + gx1 - gx0]
    gt_crop = g0[gy0:gy1, gx0:gx1]
    partial = (gy1 - gy0, gx1 - gx0) != (h, w)
    note = (f"on the {gx1 - gx0} x {gy1 - gy0} px region at x={px0}, y={py0} of {pred.name}"
            + (" (the part the ground truth covers)" if partial else ""))
    return RegionCrops(pred_crop, gt_crop,
                       np.asarray(pred.translate[-2:], float) + np.asarray([py0, px0], float) * ps,
                       np.asarray(gt.translate[-2:], float) + np.asarray([gy0, gx0], float) * gs,
                       (gy1 - gy0, gx1 - gx0), note)
