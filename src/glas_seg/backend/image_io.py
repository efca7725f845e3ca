"""Reading images and label maps, and the one normalisation shared by training and inference."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from skimage import io as skio

from .errors import GlasSegError
from .validate import check_label_ids

IMAGE_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
# Label-map file names: ``X_anno.bmp`` (GlaS), ``X_labels.tif`` (what ``glas-seg segment`` writes), ...
LABEL_SUFFIXES = ("_anno", "_labels", "_label", "_mask", "_gt")


def natural_key(name: str) -> tuple:
    """Sort key that orders ``train_2`` before ``train_10``."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


def read_image(path: str | Path) -> np.ndarray:
    """Read a PNG, BMP, JPEG or TIFF file into an array as stored on disk.

    Parameters
    ----------
    path : str or Path
        Image file.

    Returns
    -------
    image : ndarray
        ``(H, W)``, ``(H, W, C)`` or, for multi-page TIFF, ``(N, H, W[, C])``; dtype as stored,
        except that CMYK and YCbCr files are converted to RGB as their colour model declares.

    Raises
    ------
    FileNotFoundError
        No such file.
    GlasSegError
        The file cannot be decoded (the message names it and gives the reader's reason).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such image file: {path}")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return _read_tiff(path)
        converted = _declared_colour_to_rgb(path)
        if converted is not None:
            return converted
        return np.asarray(skio.imread(path))
    except Exception as exc:  # the readers raise many types; the user needs the file name
        raise GlasSegError(f"Could not read image {path.name}: {' '.join(str(exc).split())}") from exc


def _declared_colour_to_rgb(path: Path) -> np.ndarray | None:
    """RGB pixels of a CMYK or YCbCr file, converted as the file declares; None for other files.

    The readers return CMYK (print-shop JPEGs) as four channels that would pass for RGB +
    alpha, and the segmentation would silently run on ink coverage.
    """
    try:
        image = Image.open(path)
    except Exception:  # not for Pillow: the generic reader decides
        return None
    with image:
        return np.asarray(image.convert("RGB")) if image.mode in ("CMYK", "YCbCr") else None


def _read_tiff(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        data = tif.asarray()
        separated = tif.pages[0].photometric == tifffile.PHOTOMETRIC.SEPARATED
    if separated:  # CMYK: see read_image
        return _cmyk_to_rgb(data)
    return data


def _cmyk_to_rgb(data: np.ndarray) -> np.ndarray:
    """Ink coverage (C, M, Y, K on the last axis) to RGB of the same dtype, as Pillow converts it."""
    if data.shape[-1] < 4 or not np.issubdtype(data.dtype, np.integer):
        raise GlasSegError(f"unsupported CMYK layout {data.shape} {data.dtype}; convert the image to RGB")
    top = np.iinfo(data.dtype).max
    ink = data[..., :4].astype(np.float64) / top
    rgb = (1 - ink[..., :3]) * (1 - ink[..., 3:4])
    return np.round(rgb * top).astype(data.dtype)


def read_labels(path: str | Path) -> np.ndarray:
    """Read an instance label map (0 = background, ids kept as stored).

    Returns
    -------
    labels : ndarray of int32 or int64, shape ``(H, W)``

    Raises
    ------
    GlasSegError
        A colour image, non-integer values or negative ids.
    """
    labels = read_image(path)
    if labels.ndim == 3 and labels.shape[-1] in (3, 4):
        # Some tools save label maps as RGB with identical channels.
        if not np.array_equal(labels[..., 0], labels[..., 1]):
            raise GlasSegError(f"{Path(path).name} is a colour image, not a label map")
        labels = labels[..., 0]
    check_label_ids(labels, Path(path).name)  # integers, no negative ids
    return labels.astype(np.int64 if labels.max(initial=0) > np.iinfo(np.int32).max else np.int32)


def to_float_rgb(image: np.ndarray) -> np.ndarray:
    """Convert any supported 2D image to float32 RGB in ``[0, 1]``.

    The single normalisation used by training, fine-tuning and inference, so that a
    16-bit or float copy of an image gives the same prediction as its 8-bit original.

    Parameters
    ----------
    image : ndarray, shape ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``
        uint8 (divided by 255), other integers (divided by 255 or 4095 when the values fit
        in 8 or 12 bits, else by the dtype's maximum), bool, or float
        (kept if already in ``[0, 1]``, else divided by 255 when within ``[0, 255]``, else
        min-max scaled). Alpha is dropped; grey is repeated to three channels.

    Returns
    -------
    rgb : ndarray of float32, shape ``(H, W, 3)``

    Raises
    ------
    GlasSegError
        For other shapes, NaN or infinite values, or images smaller than 16 pixels a side.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        image = image[..., :3] if image.shape[-1] >= 3 else image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise GlasSegError(
            f"Expected a 2D grey, RGB or RGBA image, got shape {image.shape}; "
            "for stacks choose a plane first"
        )
    if min(image.shape[:2]) < 16:
        raise GlasSegError(f"Image is too small to segment ({image.shape[0]}x{image.shape[1]} pixels)")
    if image.dtype == np.uint8:
        rgb = image.astype(np.float32)
        rgb /= 255.0  # in place: one float copy of a slide window, not two
        return rgb
    if image.dtype == bool:
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.integer):
        # Wider integer images are often 8- or 12-bit data in a 16-bit container.
        top = int(image.max(initial=0))
        scale = 255 if top <= 255 else 4095 if top <= 4095 else np.iinfo(image.dtype).max
        return np.clip(image.astype(np.float32) / scale, 0, 1)
    if not np.issubdtype(image.dtype, np.floating):
        raise GlasSegError(f"Unsupported image dtype {image.dtype}")
    image = image.astype(np.float32)
    if not np.isfinite(image).all():
        raise GlasSegError("Image contains NaN or infinite values")
    lo, hi = float(image.min()), float(image.max())
    if lo >= 0 and hi <= 1:
        return image
    if lo >= 0 and hi <= 255:
        return image / 255.0
    return (image - lo) / max(hi - lo, 1e-12)
