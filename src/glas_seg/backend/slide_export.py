"""Exports of a slide segmentation: QuPath GeoJSON, a per-object measurement CSV, a label TIFF.

All three are read from the on-disk label store block by block (never the whole slide) and
written atomically (a temporary file renamed into place).

- GeoJSON as QuPath imports it (*File > Import objects*): a FeatureCollection with one Polygon
  (MultiPolygon when an object has several parts) per object, in base-level pixel coordinates
  of the slide, ``objectType`` ``"annotation"``, ``classification`` ``{name, color}`` and the
  measurements as a name -> value map.
- CSV: one row per label id, measured with ``skimage.measure.regionprops_table``.
- TIFF: tiled, pyramidal uint32 labels (SubIFDs), the base level the size of the region.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
from scipy import ndimage as ndi

from .outputs import write_file

__all__ = ["object_crops", "object_polygons", "measure_object", "export_objects", "write_labels_tiff",
           "CSV_COLUMNS"]

#: QuPath colours of the classifications, packed as it reads them (RGB list).
CLASS_COLOURS = {"glands": [0, 160, 80], "nuclei": [200, 40, 160]}

CSV_COLUMNS = ["id", "centroid_x_px", "centroid_y_px", "centroid_x_um", "centroid_y_um", "area_px", "area_um2",
               "perimeter_um", "eccentricity", "solidity", "major_axis_um", "minor_axis_um",
               "bbox_x", "bbox_y", "bbox_width", "bbox_height", "mean_probability"]


def object_crops(labels, objects: dict, block: int = 2048) -> Iterator[tuple[int, np.ndarray, tuple[int, int]]]:
    """Each object's mask cut from a large label array, reading one block of objects at a time.

    Parameters
    ----------
    labels : array-like ``(H, W)`` (a zarr array: only the windows asked for are read)
    objects : dict
        id -> ``{"box": [y0, x0, y1, x1], ...}``
    block : int
        Objects are grouped by the block their box's top-left corner falls in; each group is
        read as one window, the union of its boxes.

    Yields
    ------
    id, mask (bool ``(h, w)`` over the box), (y0, x0)
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for index, entry in objects.items():
        if entry.get("box") is None:
            continue
        y0, x0 = entry["box"][:2]
        groups.setdefault((y0 // block, x0 // block), []).append(index)
    for key in sorted(groups):
        ids = groups[key]
        boxes = np.array([objects[i]["box"] for i in ids])
        wy0, wx0 = boxes[:, :2].min(0)
        wy1, wx1 = boxes[:, 2:].max(0)
        window = np.asarray(labels[wy0:wy1, wx0:wx1])
        for index, (y0, x0, y1, x1) in zip(ids, boxes):
            crop = window[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] == index
            if crop.any():
                yield index, crop, (int(y0), int(x0))


def object_polygons(mask: np.ndarray, offset: tuple[float, float] = (0, 0), tolerance: float = 0.5) -> list:
    """Outer outlines of a binary mask's parts as closed rings of ``[x, y]`` pixel coordinates.

    Outlines run between pixel centres and pixel edges as ``skimage.measure.find_contours`` traces
    them at level 0.5, shifted by half a pixel so that pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``
    as in QuPath; holes are not kept. Rings are simplified to within ``tolerance`` pixels.

    Returns
    -------
    list of rings, each a list of ``[x, y]`` with the first point repeated at the end
    """
    from skimage.measure import approximate_polygon, find_contours

    oy, ox = offset
    parts, count = ndi.label(mask)
    rings = []
    for part in range(1, count + 1):
        padded = np.pad(parts == part, 1)
        contours = find_contours(padded.astype(np.uint8), 0.5)
        if not contours:
            continue
        outer = max(contours, key=len)
        outer = approximate_polygon(outer, tolerance) if tolerance > 0 else outer
        if len(outer) < 4:
            continue
        ring = [[round(float(c) - 0.5 + ox, 2), round(float(r) - 0.5 + oy, 2)] for r, c in outer]
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        rings.append(ring)
    return rings


def measure_object(mask: np.ndarray, offset: tuple[int, int], mpp: float) -> dict:
    """Shape measurements of one object (scikit-image ``regionprops_table``), lengths in um."""
    from skimage.measure import regionprops_table

    props = regionprops_table(mask.astype(np.uint8), properties=(
        "area", "centroid", "perimeter", "eccentricity", "solidity", "axis_major_length", "axis_minor_length"))
    area = float(props["area"][0])
    cy, cx = float(props["centroid-0"][0]) + offset[0] + 0.5, float(props["centroid-1"][0]) + offset[1] + 0.5
    return {
        "centroid_x_px": round(cx, 2), "centroid_y_px": round(cy, 2),
        "centroid_x_um": round(cx * mpp, 2), "centroid_y_um": round(cy * mpp, 2),
        "area_px": int(area), "area_um2": round(area * mpp**2, 2),
        "perimeter_um": round(float(props["perimeter"][0]) * mpp, 2),
        "eccentricity": round(float(props["eccentricity"][0]), 4),
        "solidity": round(float(props["solidity"][0]), 4),
        "major_axis_um": round(float(props["axis_major_length"][0]) * mpp, 2),
        "minor_axis_um": round(float(props["axis_minor_length"][0]) * mpp, 2),
    }


def export_objects(labels, objects: dict, *, mpp: float, origin: tuple[int, int] = (0, 0), task: str = "glands",
                   geojson: str | Path | None = None, csv_path: str | Path | None = None) -> int:
    """Write the objects of a label array as QuPath GeoJSON and / or a measurement CSV.

    Parameters
    ----------
    labels : array-like ``(H, W)``
        Label ids of a region of the slide (zarr array or ndarray).
    objects : dict
        id -> ``{"box": [y0, x0, y1, x1], "probability": float or None}`` in region pixels
        (:attr:`.slide_segment.SlideSegmentation.objects`).
    mpp : float
        Micrometres per pixel.
    origin : (y, x)
        The region's top-left corner in the slide's base level; added to every coordinate.
    task : str
        QuPath classification name.
    geojson, csv_path : path, optional

    Returns
    -------
    int
        Number of objects written.
    """
    rows = []
    oy, ox = origin

    def measure(out=None) -> None:
        # One pass over the objects; features are written as they come (never all in memory).
        first = True
        for index, mask, (y0, x0) in object_crops(labels, objects):
            row = {"id": int(index), **measure_object(mask, (y0 + oy, x0 + ox), mpp)}
            h, w = mask.shape
            row.update(bbox_x=x0 + ox, bbox_y=y0 + oy, bbox_width=w, bbox_height=h)
            probability = objects[index].get("probability")
            row["mean_probability"] = None if probability is None else round(float(probability), 4)
            rows.append(row)
            if out is None:
                continue
            rings = object_polygons(mask, (y0 + oy, x0 + ox))
            if not rings:
                continue
            geometry = ({"type": "Polygon", "coordinates": [rings[0]]} if len(rings) == 1
                        else {"type": "MultiPolygon", "coordinates": [[ring] for ring in rings]})
            measurements = {k: v for k, v in row.items() if k != "id" and v is not None}
            out.write(("\n" if first else ",\n") + json.dumps({
                "type": "Feature", "id": f"glas-seg-{index}", "geometry": geometry, "properties": {
                    "objectType": "annotation", "name": f"{task} {index}",
                    "classification": {"name": task, "color": CLASS_COLOURS.get(task, [255, 200, 0])},
                    "measurements": measurements}}))
            first = False

    if geojson is not None:
        def write_geojson(tmp):
            with open(tmp, "w") as f:
                f.write('{"type": "FeatureCollection", "features": [')
                measure(f)
                f.write("\n]}\n")

        write_file(geojson, write_geojson, "GeoJSON")
    else:
        measure()
    if csv_path is not None:
        def write_csv(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
                writer.writeheader()
                writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)

        write_file(csv_path, write_csv, "CSV")
    return len(rows)


def write_labels_tiff(levels: list, path: str | Path, mpp: float | None = None, tile: int = 512) -> Path:
    """A tiled pyramidal uint32 label TIFF from a label pyramid (zarr arrays, base first),
    written tile by tile (zlib); the coarser levels go into SubIFDs as in OME-TIFF."""
    import tifffile

    def tiles(array) -> Iterator[np.ndarray]:
        h, w = array.shape
        band = max(tile, 1024 // tile * tile)
        for y in range(0, h, tile):
            for xb in range(0, w, band):
                strip = np.asarray(array[y : y + tile, xb : xb + band])
                for x in range(0, strip.shape[1], tile):
                    out = np.zeros((tile, tile), np.uint32)
                    part = strip[:, x : x + tile]
                    out[: part.shape[0], : part.shape[1]] = part
                    yield out

    resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}

    def write(tmp):
        with tifffile.TiffWriter(tmp, bigtiff=math.prod(levels[0].shape) * 4 > 2**31) as tif:
            tif.write(tiles(levels[0]), shape=levels[0].shape, dtype=np.uint32, tile=(tile, tile),
                      compression="zlib", subifds=len(levels) - 1, **resolution)
            for array in levels[1:]:
                tif.write(tiles(array), shape=array.shape, dtype=np.uint32, tile=(tile, tile),
                          compression="zlib", subfiletype=1)

    return write_file(path, write, "label TIFF")
