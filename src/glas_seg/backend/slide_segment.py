"""Segmenting a whole slide in bounded memory.

A slide is cut into chunks (a core plus a halo of context on every side), on a grid in the
slide's base-level pixels. Only chunks whose core holds tissue are read: tissue is found once
on a low-resolution thumbnail with :func:`.tissue.glass_mask`, so a blank slide ends almost at
once. Each chunk is read at the pyramid level nearest the model's pixel size, resampled to it,
segmented with :func:`.inference.segment` and its objects are painted into an on-disk zarr
label store at base-level resolution. Nothing whole-slide sized is ever in memory: one chunk's
pixels, its label window in the store, and a table of objects (area, box, probability sum).

Objects across chunk borders follow the rule of :mod:`.stitching`: each chunk *owns* its core.
A whole object (not cut by the chunk's edge) is kept only by the chunk whose core holds the
centre of its box, where it is seen with the most context; an object cut by the chunk's edge
is kept when it reaches into the core, and it joins the object already in the store that it
overlaps by at least ``min_overlap`` of the smaller of the two (a gland crossing a border keeps
one id); objects never overwrite each other's pixels.

The store holds a manifest of the chunks done, written after each chunk, so a run interrupted
(or cancelled) resumes where it stopped when it is started again with the same settings.

Each window is segmented by :func:`segment_window`, which has no side effects, and painted by
:func:`paint_window`. Given a dask client, :func:`segment_slide` runs the first on the workers
(:mod:`.slide_dask`) and the second here, in chunk order: the store is the same either way.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .checkpoint import atomic_write, model_mpp
from .errors import GlasSegError
from .progress import CancelToken, Cancelled, ProgressCallback, check_callbacks, raise_if_cancelled
from .slide import SlideReader, open_slide, thumbnail

__all__ = ["tissue_mask", "chunk_grid", "tissue_windows", "segment_slide", "release_memory", "SlideSegmentation", "open_labels",
           "STORE_CHUNK", "WindowJob", "WindowResult", "segment_window", "paint_window"]

#: Side of the zarr label store's chunks, in base-level pixels.
STORE_CHUNK = 1024
MANIFEST = "glas_seg_manifest.json"
#: Thumbnail pixel size for tissue detection: cells vanish, tissue texture stays.
TISSUE_MPP = 8.0
#: Largest tissue thumbnail (pixels); bigger slides are looked at more coarsely.
MAX_THUMBNAIL_PIXELS = 4_000_000


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Each window allocates and frees a few hundred MB of arrays; glibc keeps freed blocks in its
    heap, so without this the resident size creeps up chunk after chunk (measured: 1.6 GB on a
    100 MP slide, 2.4 GB on a 1 GP one) although nothing is kept.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class SlideSegmentation:
    """Result of :func:`segment_slide`.

    store : Path
        The zarr group: arrays ``"0"`` (base level, uint32 ``(H, W)`` of the region), ``"1"``...
        (each half the previous, nearest id) for display.
    origin : (y, x)
        Top-left corner of the region in base-level pixels of the slide.
    shape : (H, W)
        Size of the region in base-level pixels.
    mpp : float
        Micrometres per base-level pixel (the slide's, ``mpp=`` or the model's when unknown).
    objects : dict
        Per object id (int): ``area`` (base-level px), ``box`` ``[y0, x0, y1, x1]`` in the
        region, ``probability`` (mean foreground probability).
    chunks : int
        Chunks on the grid; ``chunks_with_tissue`` of them were segmented.
    seconds : float
        Wall time of this call (a resumed run counts only its own part).
    """

    store: Path
    origin: tuple[int, int]
    shape: tuple[int, int]
    mpp: float
    objects: dict = field(default_factory=dict)
    chunks: int = 0
    chunks_with_tissue: int = 0
    seconds: float = 0.0

    def labels(self, level: int = 0):
        """The label array of one pyramid level (a lazy zarr array; index it to read)."""
        return open_labels(self.store)[level]


def open_labels(store: str | Path) -> list:
    """The label pyramid of a store written by :func:`segment_slide`: zarr arrays, base first.

    A label edit that a killed process left half written is completed or undone first
    (:func:`.slide_edit.finish_interrupted_write`).
    """
    import zarr

    from .slide_edit import finish_interrupted_write  # slide_edit builds on this module

    finish_interrupted_write(store)
    group = zarr.open_group(str(store), mode="r")
    levels = int(group.attrs.get("levels", 1))
    return [group[str(i)] for i in range(levels)]


# -- tissue --------------------------------------------------------------------------------------

def tissue_mask(
    reader: SlideReader,
    mpp: float | None = None,
    min_area_um2: float = 2_000.0,
    margin_um: float = 16.0,
) -> tuple[np.ndarray, float]:
    """Where a slide has tissue, on a thumbnail of about :data:`TISSUE_MPP` um per pixel.

    Tissue is everything :func:`.tissue.glass_mask` does not call glass (bright, unsaturated,
    flat), anywhere on the slide (not only at the border), less specks smaller than
    ``min_area_um2`` (dust, pen dots), grown by ``margin_um`` so that pale tissue edges are
    not cut off.

    Parameters
    ----------
    reader : SlideReader
    mpp : float, optional
        Base-level pixel size (default: the slide's; 0.5 when unknown).
    min_area_um2 : float
        Smallest piece of tissue kept (default 0.002 mm^2, a disk 50 um across: a small gland).
    margin_um : float

    Returns
    -------
    tissue : bool ndarray ``(h, w)``
    downsample : float
        Base-level pixels per mask pixel.
    """
    from .tissue import glass_mask

    mpp = mpp or reader.mpp or 0.5
    # At most about 4 MP of thumbnail: its float copies in glass_mask stay near 200 MB for any
    # slide size (a 4-gigapixel slide is looked at with ~32 um pixels, still finer than a gland).
    H, W = reader.shape
    small, downsample = thumbnail(reader, max(1.0, TISSUE_MPP / mpp, math.sqrt(H * W / MAX_THUMBNAIL_PIXELS)))
    pixel_um = mpp * downsample
    # Glass anywhere (touching_border=False), in regions of at least ~0.1 mm^2 (lumens and
    # pale stroma inside tissue are far smaller at this resolution).
    min_fraction = min(0.5, 100_000.0 / pixel_um**2 / max(1, small.shape[0] * small.shape[1]))
    # No colour rule and almost no edge band: at 8-16 um per pixel a band of glass colour grown
    # 5 pixels eats 60-80 um of pale tissue edge (100 MP benchmark slide: object F1 0.767 with the
    # defaults, 0.797 with these, 0.808 with the glass mask before its colour rule).
    glass = glass_mask(small.astype(np.float32) / 255, touching_border=False, min_fraction=min_fraction,
                       colour_tolerance=1.0, edge_band=1)
    tissue = ~glass
    regions, count = ndi.label(tissue)
    if count:
        areas = np.bincount(regions.ravel(), minlength=count + 1) * pixel_um**2
        keep = areas >= min_area_um2
        keep[0] = False
        tissue = keep[regions]
    grow = int(math.ceil(margin_um / pixel_um))
    if grow and tissue.any():
        tissue = ndi.binary_dilation(tissue, iterations=grow)
    return tissue, downsample


# -- chunks --------------------------------------------------------------------------------------

def chunk_grid(shape: tuple[int, int], core: int) -> list[tuple[int, int, int, int]]:
    """Cores ``(y0, y1, x0, x1)`` tiling a region of ``shape`` with squares of side ``core``
    (the last row and column are smaller)."""
    if core < 1:
        raise GlasSegError(f"chunk size must be at least 1 pixel, not {core}")
    h, w = shape
    return [(y, min(y + core, h), x, min(x + core, w)) for y in range(0, h, core) for x in range(0, w, core)]


def _has_tissue(tissue: np.ndarray, downsample: float, origin, box) -> bool:
    y0, y1, x0, x1 = box
    oy, ox = origin
    r0, r1 = int((oy + y0) // downsample), int(math.ceil((oy + y1) / downsample))
    c0, c1 = int((ox + x0) // downsample), int(math.ceil((ox + x1) / downsample))
    return bool(tissue[r0:r1, c0:c1].any())


def _resample(rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 RGB image to ``shape`` (antialiased when shrinking).

    Pillow works on the uint8 pixels directly: a 40x window of 6000 x 6000 pixels costs its
    100 MB, not the 430 MB of a float copy.
    """
    if rgb.shape[:2] == tuple(shape):
        return rgb
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb))
    return np.asarray(image.resize((int(shape[1]), int(shape[0])), Image.Resampling.BILINEAR))


# -- objects of one chunk ------------------------------------------------------------------------

def chunk_pieces(labels: np.ndarray, window: tuple[int, int, int, int], core: tuple[int, int, int, int],
                 region_shape: tuple[int, int]) -> list[tuple[int, tuple[slice, slice], bool]]:
    """The objects of one chunk that this chunk keeps.

    Parameters
    ----------
    labels : int ndarray ``(h, w)``
        The chunk's labels over ``window``, in base-level pixels. Changed in place: all but the
        largest connected part of each object are cleared.
    window, core : (y0, y1, x0, x1)
        Where the labels lie, and the part of the region the chunk owns (region coordinates).
    region_shape : (H, W)
        Window edges on the region's border cut nothing.

    Returns
    -------
    list of ``(id, box, cut)``: an id of ``labels``, its bounding box (slices into ``labels``),
    and whether the chunk's edge cuts it.
    """
    wy0, wy1, wx0, wx1 = window
    h, w = labels.shape
    kept = []
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        # An object is one connected piece: stray pixels of it elsewhere (left by the glass mask
        # at a window's edge) would make it look cut and claim pixels far from it.
        parts, count = ndi.label(labels[box] == index, structure=np.ones((3, 3), bool))
        if count > 1:
            largest = 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
            labels[box][(parts > 0) & (parts != largest)] = 0
            rows, cols = np.nonzero((parts == largest).any(1))[0], np.nonzero((parts == largest).any(0))[0]
            box = (slice(box[0].start + int(rows[0]), box[0].start + int(rows[-1]) + 1),
                   slice(box[1].start + int(cols[0]), box[1].start + int(cols[-1]) + 1))
        r0, r1, c0, c1 = box[0].start, box[0].stop, box[1].start, box[1].stop
        cut = bool((r0 == 0 and wy0 > 0) or (c0 == 0 and wx0 > 0)
                   or (r1 == h and wy1 < region_shape[0]) or (c1 == w and wx1 < region_shape[1]))
        if cut:
            # Kept when it reaches into the core: the rest of it joins it from the neighbours.
            mask = labels[box] == index
            rows = slice(max(core[0] - wy0 - r0, 0), max(core[1] - wy0 - r0, 0))
            cols = slice(max(core[2] - wx0 - c0, 0), max(core[3] - wx0 - c0, 0))
            if not mask[rows, cols].any():
                continue
        else:
            centre_y, centre_x = wy0 + (r0 + r1) / 2, wx0 + (c0 + c1) / 2
            if not (core[0] <= centre_y < core[1] and core[2] <= centre_x < core[3]):
                continue
        kept.append((index, box, cut))
    return kept


def paint_pieces(window_labels: np.ndarray, chunk_labels: np.ndarray, pieces, objects: dict, next_id: int,
                 offset: tuple[int, int], probabilities: dict | None = None, min_overlap: float = 0.3,
                 min_size: int = 1) -> int:
    """Paint a chunk's pieces into the store's window, merging with objects already there.

    ``window_labels`` (the store's labels over the chunk's window, uint32) is changed in place;
    ``objects`` (id -> ``{"area", "box", "p"}``) is updated. Whole pieces go first. A piece that
    covers at least ``min_overlap`` of the part of an object already there that lies in this
    window (or of itself) joins it; any
    other piece of at least ``min_size`` pixels becomes a new object. Only background pixels
    are painted. Returns the next free id.
    """
    oy, ox = offset
    for index, box, cut in sorted(pieces, key=lambda p: p[2]):
        mask = chunk_labels[box] == index
        target_window = window_labels[box]
        area = int(mask.sum())
        under = target_window[mask]
        ids, counts = np.unique(under[under > 0], return_counts=True)
        target = None
        if ids.size:
            # Against the part of the object inside this window: a neighbour's piece of an object
            # cut by a chunk edge overlaps this one only in the halo they share.
            inside = [_pixels_in_window(window_labels, int(i), objects[int(i)]["box"], offset) for i in ids]
            fractions = counts / np.minimum(area, inside)
            best = int(np.argmax(fractions))
            if fractions[best] >= min_overlap:
                target = int(ids[best])
        free = mask & (target_window == 0)
        painted = int(free.sum())
        if target is None:
            if painted < min_size:
                continue
            target, next_id = next_id, next_id + 1
            objects[target] = {"area": 0, "box": None, "p": [0.0, 0]}
        if not painted:
            continue
        target_window[free] = target
        entry = objects[target]
        entry["area"] += painted
        rows, cols = np.nonzero(free.any(1))[0], np.nonzero(free.any(0))[0]
        b = entry["box"] or [math.inf, math.inf, -math.inf, -math.inf]
        entry["box"] = [min(b[0], box[0].start + oy + int(rows[0])), min(b[1], box[1].start + ox + int(cols[0])),
                        max(b[2], box[0].start + oy + int(rows[-1]) + 1), max(b[3], box[1].start + ox + int(cols[-1]) + 1)]
        if probabilities is not None and index in probabilities:
            mean = probabilities[index]
            entry["p"][0] += mean * painted
            entry["p"][1] += painted
    return next_id


def _pixels_in_window(window_labels: np.ndarray, index: int, box, offset) -> int:
    """Pixels of object ``index`` (box ``[y0, x0, y1, x1]`` in region pixels) in the window."""
    oy, ox = offset
    y0, x0 = max(int(box[0]) - oy, 0), max(int(box[1]) - ox, 0)
    return int(np.count_nonzero(window_labels[y0 : max(int(box[2]) - oy, 0), x0 : max(int(box[3]) - ox, 0)] == index))


# -- the whole slide -----------------------------------------------------------------------------

def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _write_manifest(store: Path, manifest: dict) -> None:
    atomic_write(store / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest)))


def _region_box(reader: SlideReader, region) -> tuple[int, int, int, int]:
    """``(y, x, h, w)`` in base-level pixels from ``region = (x, y, w, h)`` or None (whole slide)."""
    H, W = reader.shape
    if region is None:
        return 0, 0, H, W
    try:
        x, y, w, h = (int(v) for v in region)
    except (TypeError, ValueError):
        raise GlasSegError(f"region must be 4 integers x, y, width, height, not {region!r}") from None
    if w < 16 or h < 16 or x < 0 or y < 0 or x + w > W or y + h > H:
        raise GlasSegError(f"region x={x}, y={y}, {w} x {h} must lie inside the slide ({W} x {H} px) "
                           "and be at least 16 px a side")
    return y, x, h, w


def segment_slide(
    model,
    slide: str | Path | SlideReader,
    store: str | Path,
    *,
    mpp: float | None = None,
    region: tuple[int, int, int, int] | None = None,
    level: int | None = None,
    chunk_size: int = 2048,
    halo: int = 256,
    min_size: int | None = None,
    mask_glass: bool = True,
    tile_size: int | None = None,
    overlap: float = 0.25,
    batch_size: int | None = None,
    tta: bool = False,
    device: str = "auto",
    resume: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelToken = None,
    client=None,
    worker_options=None,
) -> SlideSegmentation:
    """Segment a whole slide (or a region of it) into an on-disk zarr label pyramid.

    Parameters
    ----------
    model : str, Path or LoadedModel
        A model name, a ``.safetensors`` path (loaded on ``device``) or a loaded model.
    slide : path or SlideReader
    store : path
        Folder of the zarr group to write (``<stem>_labels.zarr``). A store from an interrupted
        run with the same settings is resumed; one with other settings is replaced.
    mpp : float, optional
        Micrometres per base-level pixel, overriding the slide's metadata. When neither gives
        it, a warning says so and the model's own pixel size is assumed.
    region : (x, y, width, height), optional
        Base-level pixels; default the whole slide.
    level : int, optional
        Pyramid level to read (default: the coarsest at least as sharp as the model's pixel size).
    chunk_size, halo : int
        Core side and context on each side of a chunk, in pixels at the model's pixel size.
    min_size : int, optional
        Smallest object kept, in pixels at the model's pixel size (default: the model's).
    mask_glass : bool
        Passed to :func:`.inference.segment`: glass at a chunk's tissue edge stays background.
    tile_size, overlap, batch_size, tta
        Tiled prediction inside each window, as for :func:`.inference.predict_probabilities`.
        ``batch_size`` None: 4 tiles at a time on a GPU, 1 on the CPU, where batching saves no
        time (one 6.6 MP window: 4.1 s with 1, 4.6 s with 4) and each extra 512-pixel tile of
        the default model holds about 150 MB of activations, the largest part of a slide run's
        peak memory (docs/benchmarks.md).
    device : str
        Where to load a model given by name or path.
    resume : bool
        Continue a store left by an interrupted run (False: always start afresh).
    progress : callable ``progress(done, total)``, optional
        Called after each chunk with tissue; ``total`` is the number of such chunks.
    cancel : threading.Event or callable, optional
        Checked between chunks and between tile batches; :class:`.progress.Cancelled` is raised
        and the store keeps the chunks finished so far (a later run resumes).
    client : distributed.Client, optional
        Split the slide across the workers of this dask client: they read and segment the
        windows (:func:`segment_window`, at most two per worker thread at a time) and this
        process paints the results in chunk order, so the store is the same as without a
        client. Cancelling cancels the windows not yet painted; ``cancel`` is not seen by the
        windows already running on workers.
    worker_options : batch.SegmentOptions, optional
        With ``client``: how the workers load the model (file, device, mode; each worker loads
        it once and keeps it). Default: from ``model`` when it is a name or a path, on
        ``device``; a loaded ``model`` then needs it.

    Returns
    -------
    SlideSegmentation
    """
    import zarr

    from .validate import check_segment_options

    check_callbacks(progress, cancel)
    check_segment_options(tile_size, overlap, 1 if batch_size is None else batch_size, min_size=min_size)
    if client is not None:
        from .slide_dask import driver_model

        # This process only paints: it needs the model's configuration, not its weights.
        model, worker_options = driver_model(model, worker_options, device)
    elif isinstance(model, (str, Path)):
        from .registry import load_model

        model = load_model(model, device)
    if batch_size is None:
        where = worker_options.device if client is not None else getattr(getattr(model, "device", None), "type", "cpu")
        batch_size = 4 if str(where).startswith("cuda") else 1
    predict_kwargs = {"tile_size": tile_size, "overlap": overlap, "batch_size": batch_size, "tta": tta}
    if chunk_size < 64 or halo < 0:
        raise GlasSegError(f"chunk size must be at least 64 and halo at least 0, not {chunk_size} and {halo}")
    if mpp is not None and not (0.05 <= mpp <= 20):
        raise GlasSegError(f"mpp {mpp} is not a pixel size in micrometres (expected 0.05 to 20)")
    start = time.perf_counter()
    reader = open_slide(slide) if isinstance(slide, (str, Path)) else slide
    try:
        target_mpp = model_mpp(model.config)
        slide_mpp = mpp or reader.mpp
        if slide_mpp is None:
            warnings.warn(f"{reader.path.name} does not record its pixel size; assuming the model's "
                          f"{target_mpp} um/px (give --mpp if it differs)", stacklevel=2)
            slide_mpp = target_mpp
        if level is None:
            level = reader.best_level(target_mpp / slide_mpp)
        elif not 0 <= level < len(reader.levels):
            raise GlasSegError(f"{reader.path.name} has levels 0 to {len(reader.levels) - 1}, not {level}")
        d = reader.levels[level].downsample
        # Base-level pixels per model pixel; a model pixel within 5 % of a base pixel is taken as
        # equal, to spare a resampling that would only blur.
        ratio = target_mpp / slide_mpp
        if abs(d / ratio - 1) < 0.05:
            ratio = d
        oy, ox, H, W = _region_box(reader, region)
        core = max(1, round(chunk_size * ratio))
        margin = round(halo * ratio)
        min_size = model.config.min_size if min_size is None else int(min_size)
        base_min_size = max(1, round(min_size * ratio**2))
        settings = {"slide": str(Path(reader.path).resolve()), "size": list(reader.shape), "model": model.config.name,
                    "weights": model.config.to_json(), "mpp": slide_mpp, "region": [oy, ox, H, W],
                    "level": level, "core": core, "margin": margin, "min_size": min_size, "mask_glass": mask_glass,
                    "window_step": WINDOW_STEP,
                    "predict": {k: predict_kwargs[k] for k in sorted(predict_kwargs) if k not in ("progress", "cancel")}}
        fingerprint = _fingerprint(settings)

        store = Path(store)
        manifest = None
        if resume and (store / MANIFEST).is_file():
            from .slide_edit import finish_interrupted_write

            finish_interrupted_write(store)  # an edit killed half-way: the store as before or after it
            try:
                manifest = json.loads((store / MANIFEST).read_text())
            except (OSError, ValueError):
                manifest = None
            if manifest is not None and manifest.get("fingerprint") != fingerprint:
                manifest = None
        if manifest is None:
            if store.exists():
                if not store.is_dir() or (any(store.iterdir()) and not (store / MANIFEST).is_file()
                                          and not (store / "zarr.json").is_file()):
                    raise GlasSegError(f"{store} exists and is not a glas-seg label store; choose another output")
                shutil.rmtree(store)
            group = zarr.open_group(str(store), mode="w")
            group.create_array("0", shape=(H, W), chunks=(STORE_CHUNK, STORE_CHUNK), dtype="uint32", fill_value=0)
            manifest = {"fingerprint": fingerprint, "settings": settings, "done": [], "next_id": 1, "objects": {},
                        "complete": False}
            _write_manifest(store, manifest)
        group = zarr.open_group(str(store), mode="a")
        labels0 = group["0"]
        objects = {int(k): v for k, v in manifest["objects"].items()}
        done = set(manifest["done"])
        next_id = manifest["next_id"]

        tissue, tissue_downsample = tissue_mask(reader, slide_mpp)
        release_memory()
        cores = chunk_grid((H, W), core)
        todo = [i for i, box in enumerate(cores) if _has_tissue(tissue, tissue_downsample, (oy, ox), box)]
        finished = sum(1 for i in todo if i in done)
        if progress is not None:
            progress(finished, len(todo))
        slide_path = str(Path(reader.path).resolve())
        predict = tuple(sorted(predict_kwargs.items()))
        # Every window still to do, in chunk order: painting them in this order gives the same
        # store whichever process segments them.
        pending = [(i, [WindowJob(slide_path, level, box, cores[i], (oy, ox), (H, W), ratio, min_size, mask_glass,
                                  predict)
                        for box in tissue_windows(tissue, tissue_downsample, (oy, ox), cores[i], margin, (H, W))])
                   for i in todo if i not in done]
        if client is None:
            results = (segment_window(model, reader, job, cancel) for _, jobs in pending for job in jobs)
        else:
            from .slide_dask import segment_windows_on_dask

            results = segment_windows_on_dask(client, worker_options, [job for _, jobs in pending for job in jobs],
                                              cancel=cancel)
        try:
            for i, jobs in pending:
                raise_if_cancelled(cancel)
                for _ in jobs:
                    next_id = paint_window(labels0, next(results), objects, next_id, base_min_size)
                    release_memory()  # after every window: a chunk of many windows kept each one's heap
                done.add(i)
                finished += 1
                manifest.update(done=sorted(done), next_id=next_id, objects={str(k): v for k, v in objects.items()})
                _write_manifest(store, manifest)
                if progress is not None:
                    progress(finished, len(todo))
        finally:
            results.close()  # on the workers: cancel the windows not painted (cancel, error)
        levels = build_pyramid(group)
        release_memory()
        group.attrs.update({"levels": levels, "origin": [oy, ox], "mpp": slide_mpp, "task": model.config.task,
                            "model": model.config.name})
        manifest["complete"] = True
        _write_manifest(store, manifest)
        table = {k: {"area": v["area"], "box": v["box"], "probability": v["p"][0] / v["p"][1] if v["p"][1] else None}
                 for k, v in sorted(objects.items())}
        return SlideSegmentation(store, (oy, ox), (H, W), slide_mpp, table, len(cores), len(todo),
                                 time.perf_counter() - start)
    finally:
        if isinstance(slide, (str, Path)):
            reader.close()


def tissue_windows(tissue: np.ndarray, downsample: float, origin, core, margin: int,
                   region_shape) -> list[tuple[int, int, int, int]]:
    """The windows of a chunk worth segmenting: around each piece of tissue in its core.

    Pieces of tissue in the core (on the thumbnail) each give their bounding box, grown by
    ``margin`` on the sides where it reaches the core's edge (by a sixteenth of it elsewhere);
    overlapping boxes are merged when their union costs no more pixels than the two apart (else
    both are segmented, and objects seen twice join as across chunk borders). Contiguous tissue gives the chunk's whole window;
    small fragments scattered on glass give small windows, so the network never runs on the
    glass between them.

    Returns
    -------
    list of ``(y0, y1, x0, x1)`` in region pixels, inside the region
    """
    oy, ox = origin
    y0, y1, x0, x1 = core
    H, W = region_shape
    r0, c0 = int((oy + y0) // downsample), int((ox + x0) // downsample)
    r1, c1 = int(math.ceil((oy + y1) / downsample)), int(math.ceil((ox + x1) / downsample))
    boxes = []
    for rows, cols in ndi.find_objects(ndi.label(tissue[r0:r1, c0:c1])[0]):
        by0, by1 = max(y0, int((r0 + rows.start) * downsample) - oy), min(y1, int(math.ceil((r0 + rows.stop) * downsample)) - oy)
        bx0, bx1 = max(x0, int((c0 + cols.start) * downsample) - ox), min(x1, int(math.ceil((c0 + cols.stop) * downsample)) - ox)
        # The full halo only where the tissue runs on into the neighbouring chunk; elsewhere the
        # tissue ends on glass inside the core, and a little glass is all the context it needs.
        near = max(1, margin // 16)
        boxes.append([max(0, by0 - (margin if by0 == y0 else near)), min(H, by1 + (margin if by1 == y1 else near)),
                      max(0, bx0 - (margin if bx0 == x0 else near)), min(W, bx1 + (margin if bx1 == x1 else near))])
    def area(box) -> int:
        return (box[1] - box[0]) * (box[3] - box[2])

    merged = True
    while merged:  # merge overlapping boxes while their union costs less than the two apart
        merged = False
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                p, q = boxes[a], boxes[b]
                union = [min(p[0], q[0]), max(p[1], q[1]), min(p[2], q[2]), max(p[3], q[3])]
                if p[0] < q[1] and q[0] < p[1] and p[2] < q[3] and q[2] < p[3] and area(union) <= area(p) + area(q):
                    boxes[a] = [min(p[0], q[0]), max(p[1], q[1]), min(p[2], q[2]), max(p[3], q[3])]
                    del boxes[b]
                    merged = True
                    break
            if merged:
                break
    return [tuple(box) for box in boxes]


@dataclass(frozen=True)
class WindowJob:
    """One window of a chunk to segment: everything :func:`segment_window` needs besides the model.

    Small and picklable (a path and numbers, no pixels), so that it can be sent to a dask worker
    that reads the window itself (the slide must be readable there at the same path).

    Attributes
    ----------
    slide : str
        Absolute path of the slide.
    level : int
        Pyramid level to read.
    window, core : (y0, y1, x0, x1)
        The window to segment and the core of the chunk it belongs to, in region pixels
        (base level, relative to ``origin``).
    origin : (y, x)
        Top-left corner of the region in base-level slide pixels.
    region_shape : (H, W)
    ratio : float
        Base-level pixels per model pixel.
    min_size : int
        Smallest object, in model pixels (passed to :func:`.inference.segment`).
    mask_glass : bool
    predict : tuple of (name, value)
        Keyword arguments of the tiled prediction (tile_size, overlap, batch_size, tta), as
        sorted pairs so that the job stays hashable.
    """

    slide: str
    level: int
    window: tuple[int, int, int, int]
    core: tuple[int, int, int, int]
    origin: tuple[int, int]
    region_shape: tuple[int, int]
    ratio: float
    min_size: int
    mask_glass: bool
    predict: tuple = ()


@dataclass
class WindowResult:
    """What segmenting one window gives, before anything is painted (picklable).

    Attributes
    ----------
    window : (y0, y1, x0, x1)
        Where ``labels`` lie, in region pixels.
    labels : int32 ndarray ``(y1 - y0, x1 - x0)``
        The window's instance ids on the base-level grid; only the ids of ``pieces`` are used.
        (A window of 2048 + 2 x 256 model pixels at a 1:1 ratio is 26 MB.)
    pieces : list of ``(id, (slice, slice), cut)``
        The objects this chunk keeps (:func:`chunk_pieces`).
    probabilities : dict
        Mean foreground probability per id of ``labels`` (float).
    """

    window: tuple[int, int, int, int]
    labels: np.ndarray
    pieces: list
    probabilities: dict


def segment_window(model, reader: SlideReader, job: WindowJob, cancel: CancelToken = None) -> WindowResult:
    """Read and segment one window; no side effects (the painting is :func:`paint_window`).

    Runs in the process that owns the label store or, for a slide split across dask workers
    (:mod:`.slide_dask`), on any worker: its result depends only on the slide, the model and
    ``job``, which is what lets the owner paint the results in chunk order and get the same
    store whichever process segmented each window.

    Parameters
    ----------
    model : LoadedModel
    reader : SlideReader
        The slide of ``job.slide`` (already open).
    job : WindowJob
    cancel : threading.Event or callable, optional
        Checked between tile batches.

    Returns
    -------
    WindowResult
    """
    from . import inference
    from .postprocess import resize_labels

    oy, ox = job.origin
    wy0, wy1, wx0, wx1 = job.window
    d = reader.levels[job.level].downsample
    # Read the window at the chosen level (whole level pixels covering it).
    ly0, lx0 = int((oy + wy0) // d), int((ox + wx0) // d)
    ly1, lx1 = int(math.ceil((oy + wy1) / d)), int(math.ceil((ox + wx1) / d))
    # Read with real context around the window up to a multiple of WINDOW_STEP model pixels a
    # side, so that the network sees few distinct input shapes.
    level_h, level_w = reader.levels[job.level].shape
    model_per_level = d / job.ratio
    ly0, ly1 = _grow_to_step(ly0, ly1, level_h, model_per_level)
    lx0, lx1 = _grow_to_step(lx0, lx1, level_w, model_per_level)
    rgb = reader.read_region(job.level, ly0, lx0, ly1 - ly0, lx1 - lx0)
    model_shape = (_model_length(ly1 - ly0, model_per_level), _model_length(lx1 - lx0, model_per_level))
    # inference.segment looked up at call time (not imported by name): tests stand in for it.
    result = inference.segment(model, _resample(rgb, model_shape), min_size=job.min_size, mask_glass=job.mask_glass,
                               cancel=cancel, **dict(job.predict))
    del rgb
    # Labels back on the base-level grid of the read window, then cut to the window.
    read_y0, read_x0 = round(ly0 * d) - oy, round(lx0 * d) - ox
    read_shape = (round(ly1 * d) - oy - read_y0, round(lx1 * d) - ox - read_x0)
    chunk = resize_labels(result.labels, read_shape)
    chunk = np.ascontiguousarray(chunk[wy0 - read_y0 : wy1 - read_y0, wx0 - read_x0 : wx1 - read_x0])
    if chunk.dtype.itemsize > 4 and (not chunk.size or chunk.max() < 2**31):
        chunk = chunk.astype(np.int32)  # the same ids in half the bytes to send back from a worker
    probabilities = _mean_foreground(result.labels, result.foreground)
    del result
    pieces = chunk_pieces(chunk, job.window, job.core, job.region_shape)
    return WindowResult(job.window, chunk, pieces, probabilities)


#: Windows are read (with the slide's own pixels around them) to a multiple of this many model
#: pixels a side. oneDNN compiles and keeps kernels for every input shape the network sees, and
#: windows of all different sizes made the resident memory creep (320 MP benchmark slide, 96
#: windows: peak 1.50 GB; 1.29 GB with this step, 1.38-1.45 GB with 128). The cost is compute on
#: the added context, only for windows smaller than a chunk (a full chunk with its halo, 2560
#: model pixels, is already a multiple): +29 to 35 % pixels on the benchmark slides, whose tissue
#: is GlaS images scattered on glass (128: +16 to 21 %).
WINDOW_STEP = 256


def _grow_to_step(start: int, stop: int, limit: int, model_per_pixel: float) -> tuple[int, int]:
    """``[start, stop)`` grown about its centre, within ``[0, limit)``, to a length whose size in
    model pixels (``length * model_per_pixel``) is a multiple of :data:`WINDOW_STEP`."""
    length = stop - start
    steps = max(1, math.ceil(length * model_per_pixel / WINDOW_STEP - 1e-6))
    target = min(limit, max(length, math.ceil(steps * WINDOW_STEP / model_per_pixel - 1e-6)))
    start = max(0, start - (target - length) // 2)
    start = min(start, limit - target)
    return start, start + target


def _model_length(length: int, model_per_pixel: float) -> int:
    """Model pixels for ``length`` read pixels: the :data:`WINDOW_STEP` multiple it was grown to
    (rounding would miss it by one), else the rounded size."""
    size = length * model_per_pixel
    snapped = WINDOW_STEP * round(size / WINDOW_STEP)
    return max(16, snapped if snapped and abs(size - snapped) <= 1.5 else round(size))


def paint_window(labels0, result: WindowResult, objects: dict, next_id: int, min_size: int) -> int:
    """Paint one segmented window into the store (in the process that owns it).

    Parameters
    ----------
    labels0 : zarr array, uint32 ``(H, W)``
        The store's base level; the window of ``result`` is read, painted and written back.
    result : WindowResult
    objects : dict
        The object table (id -> ``{"area", "box", "p"}``), updated.
    next_id : int
        First free id.
    min_size : int
        Smallest new object, in base-level pixels.

    Returns
    -------
    int
        The next free id.
    """
    wy0, wy1, wx0, wx1 = result.window
    window = labels0[wy0:wy1, wx0:wx1]
    # Ids at or above next_id were painted by a run stopped before it recorded them.
    window[window >= next_id] = 0
    next_id = paint_pieces(window, result.labels, result.pieces, objects, next_id, (wy0, wx0), result.probabilities,
                           min_size=min_size)
    labels0[wy0:wy1, wx0:wx1] = window
    return next_id


def _mean_foreground(labels: np.ndarray, foreground: np.ndarray) -> dict:
    """Mean foreground probability per id of ``labels``, measured at the working scale."""
    from .postprocess import resize_labels

    small = resize_labels(labels, foreground.shape)
    ids = np.unique(small)
    ids = ids[ids > 0]
    if not ids.size:
        return {}
    means = ndi.mean(foreground, small, index=ids)
    return {int(i): float(m) for i, m in zip(ids, means)}


def build_pyramid(group, min_side: int = 512) -> int:
    """Write levels ``"1"``, ``"2"``... of a label store, each half the previous (nearest id),
    block by block through dask, until a level's longer side is at most ``min_side``.

    Returns the number of levels, the base included.
    """
    import dask
    import dask.array as da

    level = 0
    array = group["0"]
    while max(array.shape) > min_side:
        smaller = da.from_zarr(array)[::2, ::2].rechunk(STORE_CHUNK)
        target = group.create_array(str(level + 1), shape=smaller.shape, chunks=(STORE_CHUNK, STORE_CHUNK),
                                    dtype="uint32", fill_value=0, overwrite=True)
        with dask.config.set(scheduler="synchronous"):  # one block at a time: bounded memory
            da.store(smaller, target, lock=False)
        array = target
        level += 1
    return level + 1
