"""Whole-slide images: one small reader interface over OpenSlide and tifffile.

Vendor formats (Aperio SVS, Hamamatsu NDPI, MIRAX MRXS, Leica SCN, Ventana BIF, Philips TIFF...)
are read through ``openslide-python`` (its C library comes in the ``openslide-bin`` wheel);
OME-TIFF and other (pyramidal) TIFFs through tifffile's zarr store, which OpenSlide does not
read. Both give the same interface, :class:`SlideReader`: the levels of the pyramid, regions of
any level as uint8 RGB, the pixel size in micrometres, and the associated images (label, macro).
Nothing here loads a whole level: regions are read on demand, so a slide of any size costs the
memory of the regions asked for.
"""

from __future__ import annotations

import abc
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GlasSegError

__all__ = ["Level", "SlideReader", "open_slide", "is_slide", "SLIDE_SUFFIXES", "thumbnail", "level_arrays"]

#: Files that are slides by their suffix alone (OpenSlide's vendor formats).
VENDOR_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
#: Every suffix :func:`open_slide` may read (TIFFs only when they hold a pyramid, see :func:`is_slide`).
SLIDE_SUFFIXES = VENDOR_SUFFIXES + (".tif", ".tiff")


@dataclass(frozen=True)
class Level:
    """One level of a slide's pyramid.

    shape : (height, width) in pixels of this level
    downsample : float
        Level-0 pixels per pixel of this level (1.0 for the base level).
    """

    shape: tuple[int, int]
    downsample: float


class SlideReader(abc.ABC):
    """A slide opened for reading regions (use :func:`open_slide`; close it, or use ``with``).

    Attributes
    ----------
    path : Path
    levels : list of Level
        Base level first, then coarser ones.
    mpp : float or None
        Micrometres per pixel of the base level, from the file's metadata; None when unknown.
    """

    path: Path
    levels: list[Level]
    mpp: float | None

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the base level."""
        return self.levels[0].shape

    def read_region(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Pixels of one level, ``(height, width, 3)`` uint8 RGB.

        ``y, x`` are in the pixels of ``level``; the part of the region outside the level is
        white (blank glass), so that a caller can read windows that overhang the slide's edge.
        """
        if not 0 <= level < len(self.levels):
            raise GlasSegError(f"{self.path.name} has levels 0 to {len(self.levels) - 1}, not {level}")
        if height < 0 or width < 0:
            raise GlasSegError(f"region size must not be negative, got {height} x {width}")
        out = np.full((height, width, 3), 255, np.uint8)
        h, w = self.levels[level].shape
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + height, h), min(x + width, w)
        if y1 > y0 and x1 > x0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read(level, y0, x0, y1 - y0, x1 - x0)
        return out

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (at least as sharp)."""
        fitting = [i for i, lv in enumerate(self.levels) if lv.downsample <= downsample * 1.001]
        return max(fitting, key=lambda i: self.levels[i].downsample) if fitting else 0

    @property
    def associated_names(self) -> list[str]:
        """Names of the associated images (``label``, ``macro``, ``thumbnail``...)."""
        return []

    def associated_image(self, name: str) -> np.ndarray:
        """An associated image as ``(H, W, 3)`` uint8 RGB."""
        raise GlasSegError(f"{self.path.name} has no associated image {name!r} "
                           f"(it has: {', '.join(self.associated_names) or 'none'})")

    @abc.abstractmethod
    def _read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Pixels of a region inside the level, ``(height, width, 3)`` uint8 (each format's own)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.path.name} {self.shape[1]} x {self.shape[0]} px, "
                f"{len(self.levels)} level(s), mpp={self.mpp}>")


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA from OpenSlide (premultiplied; transparent outside the scanned area) -> RGB on white."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    # Premultiplied alpha: colour + (1 - alpha) * white.
    return np.minimum(rgb + (255 - alpha), 255).astype(np.uint8)


class OpenSlideReader(SlideReader):
    """Vendor formats through OpenSlide."""

    def __init__(self, path: Path):
        import openslide

        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            raise GlasSegError(f"{self.path.name}: OpenSlide cannot read this slide ({exc})") from None
        s = self._slide
        self.levels = [Level((int(h), int(w)), float(d)) for (w, h), d in zip(s.level_dimensions, s.level_downsamples)]
        mpp_x, mpp_y = (_positive_float(s.properties.get(f"openslide.mpp-{a}")) for a in "xy")
        self.mpp = mpp_x if mpp_y is None else (mpp_y if mpp_x is None else (mpp_x + mpp_y) / 2)
        self.vendor = s.properties.get("openslide.vendor")

    def _read(self, level, y, x, height, width):
        # OpenSlide takes the top-left corner in level-0 coordinates and the size in level pixels.
        d = self.levels[level].downsample
        region = self._slide.read_region((round(x * d), round(y * d)), level, (width, height))
        return _composite_on_white(np.asarray(region))

    @property
    def associated_names(self):
        return sorted(self._slide.associated_images.keys())

    def associated_image(self, name):
        if name not in self._slide.associated_images:
            return super().associated_image(name)
        return _composite_on_white(np.asarray(self._slide.associated_images[name].convert("RGBA")))

    def close(self):
        self._slide.close()


class TiffSlideReader(SlideReader):
    """OME-TIFF and other (pyramidal) TIFFs through tifffile's zarr store."""

    def __init__(self, path: Path):
        import tifffile
        import zarr

        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series[0]
        except (tifffile.TiffFileError, OSError, IndexError) as exc:
            raise GlasSegError(f"{self.path.name} is not a readable TIFF ({exc})") from None
        self._axes = series.axes.replace("C", "S") if series.axes.endswith("YX") else series.axes
        if set(self._axes) - set("YXS") or not {"Y", "X"} <= set(self._axes):
            self._tif.close()
            raise GlasSegError(f"{self.path.name}: expected a 2D RGB or grey slide, got axes {series.axes} "
                               f"with shape {series.shape}")
        store = series.aszarr()
        node = zarr.open(store, mode="r")
        arrays = [node[str(i)] for i in range(len(series.levels))] if len(series.levels) > 1 else [node]
        if isinstance(node, zarr.Array):
            arrays = [node]
        self._arrays = arrays
        self._lock = threading.Lock()  # one file handle: tifffile reads are not concurrent-safe
        y, x = self._axes.index("Y"), self._axes.index("X")
        base = arrays[0].shape[y], arrays[0].shape[x]
        self.levels = [Level((int(a.shape[y]), int(a.shape[x])), base[1] / a.shape[x]) for a in arrays]
        self.mpp = _tiff_mpp(self._tif)
        self._associated = {s.name.lower(): s for s in self._tif.series[1:] if s.name}

    def _read(self, level, y, x, height, width):
        index = tuple(slice(y, y + height) if a == "Y" else slice(x, x + width) if a == "X" else slice(None)
                      for a in self._axes)
        with self._lock:
            data = np.asarray(self._arrays[level][index])
        return _to_rgb8(np.moveaxis(data, self._axes.index("S"), -1) if "S" in self._axes and self._axes[-1] != "S"
                        else data)

    @property
    def associated_names(self):
        return sorted(self._associated)

    def associated_image(self, name):
        if name not in self._associated:
            return super().associated_image(name)
        return _to_rgb8(self._associated[name].asarray())

    def close(self):
        self._tif.close()


def _to_rgb8(data: np.ndarray) -> np.ndarray:
    if data.ndim == 2:
        data = np.repeat(data[..., None], 3, axis=-1)
    data = data[..., :3]
    if data.dtype == np.uint16:  # 16-bit brightfield: scale to 8 bits
        data = (data // 257).astype(np.uint8)
    return np.ascontiguousarray(data.astype(np.uint8, copy=False))


def _positive_float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _tiff_mpp(tif) -> float | None:
    """Micrometres per pixel from OME metadata, an Aperio description or the TIFF resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        match = re.search(r'PhysicalSizeX="([^"]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit.group(1) if unit else "µm")
        if match and factor:
            mpp = _positive_float(match.group(1))
            return None if mpp is None else mpp * factor
    page = tif.pages.first
    description = page.description or ""
    match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", description)
    if match:
        return _positive_float(match.group(1))
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    resolution = tags.get("XResolution")
    if unit is None or resolution is None:
        return None
    per_um = {2: 1 / 25400, 3: 1 / 10000}.get(int(unit.value))  # inch, centimetre
    numerator, denominator = resolution.value
    if per_um is None or not numerator or not denominator:
        return None
    pixels_per_unit = numerator / denominator
    mpp = 1 / (pixels_per_unit * per_um)
    # Scanners and writers that do not know the pixel size leave 1, 72 or 96 pixels per inch.
    return mpp if 0.05 <= mpp <= 100 else None


def is_slide(path: str | Path) -> bool:
    """Whether :func:`open_slide` should read ``path`` as a slide rather than as an ordinary image.

    Vendor formats are slides; a TIFF is a slide when it holds a pyramid (several levels) or a
    vendor's layout that OpenSlide recognises. A plain TIFF is an ordinary image.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in VENDOR_SUFFIXES:
        return True
    if suffix not in (".tif", ".tiff") or not path.is_file():
        return False
    vendor = _openslide_vendor(path)
    if vendor not in (None, "generic-tiff"):
        return True
    try:
        import tifffile

        with tifffile.TiffFile(str(path)) as tif:
            return len(tif.series[0].levels) > 1
    except Exception:  # noqa: BLE001 - anything unreadable is not a slide; read_image will say why
        return False


def _openslide_vendor(path: Path) -> str | None:
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - OpenSlide missing or the file unreadable: not a vendor slide
        return None


def open_slide(path: str | Path) -> SlideReader:
    """Open a whole-slide image for reading regions.

    Parameters
    ----------
    path : str or Path
        A vendor slide (SVS, NDPI, MRXS, SCN, BIF...) or a TIFF / OME-TIFF (pyramidal or not).

    Returns
    -------
    SlideReader

    Raises
    ------
    GlasSegError
        The file is missing or neither OpenSlide nor tifffile can read it.
    """
    path = Path(path)
    if not path.exists():
        raise GlasSegError(f"slide {path} does not exist")
    vendor = _openslide_vendor(path)
    if vendor not in (None, "generic-tiff"):
        return OpenSlideReader(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        return TiffSlideReader(path)
    if vendor == "generic-tiff":
        return OpenSlideReader(path)
    raise GlasSegError(f"{path.name} is not a slide OpenSlide or tifffile can read "
                       f"(slides: {', '.join(SLIDE_SUFFIXES)})")


def thumbnail(reader: SlideReader, downsample: float, block: int = 2048) -> tuple[np.ndarray, float]:
    """The whole slide at about ``downsample`` times less resolution, read in blocks.

    The pyramid level nearest below ``downsample`` is read block by block and each block is
    reduced by local means, so a slide without a low-resolution level (a plain TIFF) never
    has its base level in memory at once.

    Returns
    -------
    image : uint8 ``(h, w, 3)``
    downsample : float
        Level-0 pixels per thumbnail pixel (exact, after rounding to whole factors).
    """
    from skimage.transform import downscale_local_mean

    level = reader.best_level(downsample)
    lv = reader.levels[level]
    factor = max(1, int(downsample / lv.downsample))
    block = max(factor, block // factor * factor)
    h, w = lv.shape
    out = np.zeros((-(-h // factor), -(-w // factor), 3), np.uint8)
    for y in range(0, h, block):
        for x in range(0, w, block):
            region = reader.read_region(level, y, x, min(block, h - y), min(block, w - x))
            small = downscale_local_mean(region, (factor, factor, 1), cval=255) if factor > 1 else region
            out[y // factor : y // factor + small.shape[0], x // factor : x // factor + small.shape[1]] = \
                np.round(small).astype(np.uint8)
    return out, lv.downsample * factor


def level_arrays(reader: SlideReader, chunk: int = 512) -> list:
    """Every level of a slide as a lazy dask array, base first: ``(h, w, 3)`` uint8 RGB.

    Nothing is read until a block is computed; each block is one :meth:`SlideReader.read_region`
    call, so a viewer that shows part of a level reads only the blocks in view.
    """
    import dask.array as da

    def axis_chunks(length: int) -> tuple[int, ...]:
        return tuple(min(chunk, length - start) for start in range(0, length, chunk)) or (0,)

    arrays = []
    for index, lv in enumerate(reader.levels):
        def load(block_info=None, level=index):
            (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
            return reader.read_region(level, y0, x0, y1 - y0, x1 - x0)

        arrays.append(da.map_blocks(load, chunks=(axis_chunks(lv.shape[0]), axis_chunks(lv.shape[1]), (3,)),
                                    dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8),
                                    name=f"slide-{reader.path.name}-{index}-{id(reader)}"))
    return arrays
