"""Segment widget, slides: the region to segment and the lazy labels layer of the result.

An image layer opened by glas-seg's slide reader (:mod:`._reader`) carries ``slide_path`` in
its metadata. For such a layer the Segment widget never loads pixels itself: it hands the
slide, a region (the whole slide, the field in view, or the box around a Shapes layer's shapes)
and the options to :func:`.backend.slide_segment.segment_slide` in the background, and opens
the on-disk label pyramid it writes as a multiscale Labels layer over the slide.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from napari.layers import Shapes

from .backend.errors import GlasSegError

WHOLE, VISIBLE, SHAPES = "whole slide", "visible field", "inside Shapes layer"
SLIDE_REGIONS = [VISIBLE, SHAPES, WHOLE]
#: Role of the multiscale labels of a slide (read from disk; not offered for in-memory editing).
SLIDE_SEGMENTATION = "slide segmentation"


def is_slide_layer(layer) -> bool:
    """Whether ``layer`` is a slide opened by glas-seg's reader."""
    return bool(getattr(layer, "metadata", None) and layer.metadata.get("slide_path"))


def _level0_shape(layer) -> tuple[int, int]:
    data = layer.data[0] if layer.multiscale else layer.data
    return int(data.shape[0]), int(data.shape[1])


def _clip(layer, y0: float, x0: float, y1: float, x1: float) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` in base-level pixels, clipped to the slide (GlasSegError when too small)."""
    H, W = _level0_shape(layer)
    y0, x0 = max(0, int(np.floor(y0))), max(0, int(np.floor(x0)))
    y1, x1 = min(H, int(np.ceil(y1))), min(W, int(np.ceil(x1)))
    if y1 - y0 < 16 or x1 - x0 < 16:
        raise GlasSegError("the region to segment lies outside the slide or is smaller than 16 pixels; "
                           "pan to the tissue or draw the region over it")
    return x0, y0, x1 - x0, y1 - y0


def slide_region(viewer, layer, choice: str) -> tuple[int, int, int, int] | None:
    """The region of ``layer``'s slide that ``choice`` names, as ``(x, y, w, h)`` base-level pixels
    (None: the whole slide).

    Raises
    ------
    GlasSegError
        No Shapes layer with shapes, or a region outside the slide.
    """
    if choice == WHOLE:
        return None
    if choice == VISIBLE:
        # corner_pixels: the displayed part, in pixels of the level on screen.
        corners = np.asarray(layer.corner_pixels, float)[:, -2:]
        factor = np.asarray(layer.downsample_factors[layer.data_level], float)[-2:] if layer.multiscale else 1.0
        (y0, x0), (y1, x1) = corners[0] * factor, (corners[1] + 1) * factor
        return _clip(layer, y0, x0, y1, x1)
    if choice == SHAPES:
        shapes = [lay for lay in viewer.layers if isinstance(lay, Shapes) and len(lay.data)]
        if not shapes:
            raise GlasSegError("draw the region to segment in a Shapes layer first (rectangle or polygon)")
        target = next((s for s in shapes if s in viewer.layers.selection), shapes[-1])
        points = [layer.world_to_data(target.data_to_world(vertex))[-2:] for shape in target.data for vertex in shape]
        points = np.asarray(points, float)
        (y0, x0), (y1, x1) = points.min(0), points.max(0)
        return _clip(layer, y0, x0, y1, x1)
    raise GlasSegError(f"unknown slide region {choice!r} (choose one of {', '.join(SLIDE_REGIONS)})")


def store_path(slide_path: str, region, model_name: str) -> Path:
    """Where the label store of one (slide, region, model) goes: the user cache, so that running
    the same region again resumes or reuses it."""
    from platformdirs import user_cache_dir

    key = hashlib.sha1(f"{Path(slide_path).resolve()}|{region}|{model_name}".encode()).hexdigest()[:12]
    return Path(user_cache_dir("glas-seg")) / "slides" / f"{Path(slide_path).name.split('.')[0]}-{key}_labels.zarr"


def slide_job(slide_path: str, region, model_name: str, device: str, mode, min_size: int, options: dict):
    """The background job: ``job(report, cancel) -> (SlideSegmentation, task)``."""

    def job(report, cancel):
        from .backend.registry import load_model
        from .backend.slide_segment import segment_slide

        model = load_model(model_name, device, mode=mode)
        result = segment_slide(model, slide_path, store_path(slide_path, region, model_name), region=region,
                               min_size=min_size, mask_glass=options["mask_glass"], tile_size=options["tile_size"],
                               overlap=options["overlap"], tta=options["tta"], progress=report, cancel=cancel)
        return result, model.config.task

    return job


def add_slide_labels(viewer, image_layer, result, task: str, name: str, metadata_key: str):
    """Open a slide result's label pyramid as a lazy (multiscale) Labels layer over the slide."""
    import dask.array as da

    from .backend.slide_segment import open_labels

    levels = [da.from_zarr(array) for array in open_labels(result.store)]
    scale = np.asarray(image_layer.scale[-2:], float)
    translate = np.asarray(image_layer.translate[-2:], float) + np.asarray(result.origin, float) * scale
    return viewer.add_labels(
        levels if len(levels) > 1 else levels[0], multiscale=len(levels) > 1, name=name, scale=scale,
        translate=translate, units=tuple(image_layer.units[-2:]),
        metadata={metadata_key: {"role": SLIDE_SEGMENTATION, "store": str(result.store), "image": image_layer.name,
                                 "objects": len(result.objects), "origin": list(result.origin)}})
