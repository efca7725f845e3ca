"""Sliding-window inference with blended overlapping tiles, and segmentation end to end."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from .image_io import to_float_rgb
from .postprocess import labels_from_probabilities, remove_small_labels, resize_labels
from .tissue import fill_glass, glass_mask
from skimage.segmentation import relabel_sequential
from .models import get_architecture
from .registry import LoadedModel
from .validate import check_segment_options
from .stitching import pieces_from_tile, stitch_pieces, tile_cores

# The one progress / cancel contract (docs/progress.md); re-exported here for older imports.
from .progress import Cancelled, ProgressCallback  # noqa: E402,F401
from .progress import is_cancelled as _should_stop  # noqa: E402


@dataclass
class Segmentation:
    """Result of :func:`segment`.

    labels : int32 ``(H, W)`` instance ids at the input's size.
    probabilities : float32 ``(C, h, w)`` class probabilities at the model's working scale;
        channel 0 is background (for instance networks, channel 1 is the highest mask
        probability of any detected object).
    """

    labels: np.ndarray
    probabilities: np.ndarray

    @property
    def foreground(self) -> np.ndarray:
        """Probability that a pixel belongs to some object, float32 ``(h, w)`` at the working scale."""
        return 1.0 - self.probabilities[0]


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with tiles of ``tile``; the last one is flush."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def blend_window(height: int, width: int) -> torch.Tensor:
    """2D weights, ``(height, width)``, that fall smoothly towards a tile's edges but never reach zero.

    Padded convolutions see less context near a tile's edge; down-weighting those pixels
    where another tile covers them removes seams.
    """

    def ramp(n: int) -> torch.Tensor:
        return (torch.sin(torch.linspace(0, torch.pi, n + 2)[1:-1]) ** 2).clamp_min(1e-3)

    return ramp(height)[:, None] * ramp(width)[None, :]


def size_multiple(network: torch.nn.Module) -> int:
    """Side lengths a network needs its input to be a multiple of (its total stride).

    Every architecture's network declares it as a ``size_multiple`` attribute (it may depend on
    the builder's arguments or, for U-Net++, on the inference mode).
    """
    return int(network.size_multiple)


def prepare_input(image: np.ndarray, model: LoadedModel) -> torch.Tensor:
    """Normalise an image and resample it to the model's working scale.

    Returns
    -------
    float32 tensor ``(1, 3, h, w)`` on the CPU.
    """
    rgb = torch.from_numpy(to_float_rgb(image)).permute(2, 0, 1)[None]
    scale = model.config.scale
    if scale != 1:
        size = [max(1, round(s * scale)) for s in rgb.shape[-2:]]
        rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    mean = torch.tensor(model.config.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(model.config.std, dtype=torch.float32)[:, None, None]
    return (rgb - mean) / std


def _tiled_input(model: LoadedModel, image: np.ndarray, tile_size: int | None, overlap: float):
    """Normalised, padded input and the tiles covering it.

    Returns
    -------
    x : float32 tensor ``(1, 3, H, W)``, padded up to the network's size multiple (up to one tile)
    boxes : list of (top, left) tile positions
    tile_shape : (th, tw)
    image_shape : (h, w) at the working scale, before padding
    """
    if not 0 <= overlap <= 0.9:
        raise ValueError("overlap must be between 0 and 0.9")
    x = prepare_input(image, model)
    _, _, h, w = x.shape
    tile = int(tile_size or model.config.tile_size)
    # Tiles must be multiples of the network's total stride; small images are padded up.
    multiple = size_multiple(model.network)
    tile = max(multiple, tile // multiple * multiple)
    pad_h, pad_w = max(0, min(tile, -(-h // multiple) * multiple) - h), max(0, min(tile, -(-w // multiple) * multiple) - w)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate")
    H, W = x.shape[-2:]
    th, tw = min(tile, H), min(tile, W)
    stride_h, stride_w = max(1, int(th * (1 - overlap))), max(1, int(tw * (1 - overlap)))
    boxes = [(y, x0) for y in tile_starts(H, th, stride_h) for x0 in tile_starts(W, tw, stride_w)]
    return x, boxes, (th, tw), (h, w)


def _tile_batches(x: torch.Tensor, boxes, tile_shape, batch_size: int, device: torch.device,
                  progress: ProgressCallback | None, cancel):
    """Yield ``(positions, batch)`` of tiles cut from ``x`` on ``device``; report progress after
    each batch is consumed and raise :class:`Cancelled` between batches when asked to."""
    th, tw = tile_shape
    for start in range(0, len(boxes), batch_size):
        if _should_stop(cancel):
            raise Cancelled()
        chunk = boxes[start : start + batch_size]
        yield chunk, torch.stack([x[0, :, y : y + th, x0 : x0 + tw] for y, x0 in chunk]).to(device)
        if progress is not None:
            progress(min(start + batch_size, len(boxes)), len(boxes))


@torch.inference_mode()
def predict_probabilities(
    model: LoadedModel,
    image: np.ndarray,
    tile_size: int | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
    tta: bool = False,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
) -> np.ndarray:
    """Class probabilities of a 2D image at the model's working scale.

    Parameters
    ----------
    image : ndarray, shape ``(H, W[, C])``, any dtype :func:`to_float_rgb` accepts
    tile_size : int, optional
        Tile side in network pixels (default: the model's). Images up to this size run whole.
    overlap : float in [0, 0.9]
        Fraction of a tile shared with its neighbour.
    batch_size : int
        Tiles per forward pass.
    tta : bool
        Average over horizontal and vertical flips (3x slower).
    progress : callable(done, total), optional
    cancel : threading.Event or callable returning bool, optional
        Checked between batches; :class:`Cancelled` is raised when set.

    Returns
    -------
    probabilities : ndarray of float32, shape ``(num_classes, h, w)``
    """
    check_segment_options(tile_size, overlap, batch_size)  # GlasSegError before any work
    x, boxes, (th, tw), (h, w) = _tiled_input(model, image, tile_size, overlap)
    H, W = x.shape[-2:]
    window = blend_window(th, tw)
    num_classes = len(model.config.class_names)
    total = torch.zeros(num_classes, H, W)
    weight = torch.zeros(1, H, W)
    device = model.device
    use_amp = device.type == "cuda"
    flips = [[], [-1], [-2]] if tta else [[]]
    for chunk, batch in _tile_batches(x, boxes, (th, tw), batch_size, device, progress, cancel):
        probs = 0
        with torch.autocast(device.type, enabled=use_amp):
            for dims in flips:
                inp = batch.flip(dims) if dims else batch
                out = torch.softmax(model.network(inp).float(), dim=1)
                probs = probs + (out.flip(dims) if dims else out)
        probs = (probs / len(flips)).cpu()
        for (y, x0), p in zip(chunk, probs):
            total[:, y : y + th, x0 : x0 + tw] += p * window
            weight[:, y : y + th, x0 : x0 + tw] += window
    return (total / weight)[:, :h, :w].numpy()


def predicts_instances(model: LoadedModel) -> bool:
    """Whether the network detects instances itself (Mask R-CNN) rather than classifying pixels."""
    return get_architecture(model.config.architecture).predicts_instances


@torch.inference_mode()
def predict_instances(
    model: LoadedModel,
    image: np.ndarray,
    tile_size: int | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
    tta: bool = False,
    min_size: int = 1,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Instances of a 2D image from a detection network, stitched across tiles.

    Parameters are those of :func:`predict_probabilities`, plus ``min_size`` (pixels at the
    working scale). Flip test-time augmentation does not apply to detections.

    Returns
    -------
    labels : int32 ndarray ``(h, w)`` at the working scale
    probabilities : float32 ndarray ``(2, h, w)``: background and highest object-mask probability
    """
    if tta:
        raise ValueError(f"Flip test-time augmentation is not available for {model.config.architecture} models "
                         "(they detect instances directly); turn it off")
    check_segment_options(tile_size, overlap, batch_size)  # GlasSegError before any work
    x, boxes, (th, tw), (h, w) = _tiled_input(model, image, tile_size, overlap)
    foreground = torch.zeros(h, w)
    cores = tile_cores(boxes, (th, tw))
    pieces = []
    for chunk, batch in _tile_batches(x, boxes, (th, tw), batch_size, model.device, progress, cancel):
        with torch.autocast(model.device.type, enabled=model.device.type == "cuda"):
            detections = model.network(batch)
        for (y, x0), found in zip(chunk, detections):
            masks = found["masks"][:, 0].float().cpu()
            if len(masks):
                visible = masks[:, : h - y, : w - x0].amax(0)
                region = foreground[y : y + visible.shape[0], x0 : x0 + visible.shape[1]]
                torch.maximum(region, visible, out=region)
            pieces += pieces_from_tile(masks.numpy(), found["scores"].float().cpu().numpy(), y, x0, (h, w),
                                       core=cores[y, x0])
    labels = stitch_pieces(pieces, (h, w), min_size=min_size)
    foreground = foreground.numpy()
    return labels, np.stack([1.0 - foreground, foreground]).astype(np.float32)


def segment(
    model: LoadedModel,
    image: np.ndarray,
    min_size: int | None = None,
    mask_glass: bool = True,
    **predict_kwargs,
) -> Segmentation:
    """Instance labels for a 2D image: tiled prediction, then watershed post-processing (or,
    for networks that detect instances, the tiles' instances stitched together).

    Parameters
    ----------
    image : ndarray, shape ``(H, W[, C])``
    min_size : int, optional
        Smallest object kept, in pixels of the input image (default: the model's).
    mask_glass : bool
        Find blank glass reaching the image border (:func:`.tissue.glass_mask`), show the
        network mirrored tissue there instead, and keep it background. Models trained inside
        tissue otherwise lose the glands at a tissue edge.
    **predict_kwargs
        Passed to :func:`predict_probabilities` (tile_size, overlap, tta, progress, cancel...).

    Returns
    -------
    Segmentation
        ``labels`` int32 ``(H, W)`` and ``probabilities`` at the working scale.
    """
    check_segment_options(min_size=min_size)  # negative sizes; the rest is checked by predict_*
    config = model.config
    min_size = config.min_size if min_size is None else min_size
    shape = np.asarray(image).shape[:2]
    image, glass = hide_glass(image) if mask_glass else (image, None)
    if not predicts_instances(model):
        probabilities = predict_probabilities(model, image, **predict_kwargs)
        del image
        labels = labels_from_probabilities(probabilities, shape, min_size=min_size, scale=config.scale, glass=glass,
                                           interior_threshold=config.interior_threshold,
                                           foreground_threshold=config.foreground_threshold)
        return Segmentation(labels, probabilities)
    working_min_size = max(1, round(min_size * config.scale**2))
    labels, probabilities = predict_instances(model, image, min_size=working_min_size, **predict_kwargs)
    labels = resize_labels(labels, shape)
    if glass is not None and glass.any():
        labels[glass] = 0
        labels = relabel_sequential(remove_small_labels(labels, min_size))[0].astype(np.int32)
    return Segmentation(labels, probabilities)


def hide_glass(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float RGB of ``image`` with blank glass at its border filled with mirrored tissue.

    Returns
    -------
    rgb : ndarray of float32, shape ``(H, W, 3)``
        A new array (:func:`.image_io.to_float_rgb`), glass filled in place (:func:`.tissue.fill_glass`).
    glass : ndarray of bool, shape ``(H, W)``
        The glass (:func:`.tissue.glass_mask`): background in the result.
    """
    rgb = to_float_rgb(image)
    glass = glass_mask(rgb)
    if glass.any():
        fill_glass(rgb, glass, out=rgb)
    return rgb, glass
