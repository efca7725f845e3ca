"""napari reader: whole-slide images open as a lazy multiscale image layer.

Every pyramid level becomes a dask array whose blocks are read from the slide when napari
draws them (:func:`.backend.slide.level_arrays`), so the base level is never loaded whole. The
layer's ``scale`` is the slide's pixel size in micrometres (napari's scale bar then reads um);
a slide that does not record it opens at 1 pixel per unit.
"""

from __future__ import annotations

from pathlib import Path

from .backend.slide import is_slide, level_arrays, open_slide


def get_reader(path):
    """npe2 ``get_reader``: a reader function for one slide file, None for anything else (napari
    then offers the file to other readers: a plain TIFF is no slide)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not is_slide(path):
        return None
    return read_slide


def read_slide(path) -> list[tuple]:
    """One multiscale RGB image layer for a slide; its metadata keeps the path, pixel size and levels."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    reader = open_slide(path)
    levels = level_arrays(reader)
    kwargs = {
        "name": Path(path).name,
        "rgb": True,
        "multiscale": len(levels) > 1,
        "metadata": {"slide_path": str(Path(path).resolve()), "mpp": reader.mpp,
                     "downsamples": [lv.downsample for lv in reader.levels]},
    }
    if reader.mpp:
        kwargs["scale"] = (reader.mpp, reader.mpp)
        kwargs["units"] = ("um", "um")
    return [(levels if len(levels) > 1 else levels[0], kwargs, "image")]
