"""The public Python API of glas-seg, re-exported flat as ``glas_seg.segment`` and so on.

Thin, validating wrappers over the backend modules, with every option an explicit keyword
argument. Importing this module imports neither torch nor napari: the functions that need
torch import it when called, so ``import glas_seg`` and :func:`list_models` stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, Union

import numpy as np

from .errors import GlasSegError
from .progress import CancelToken, ProgressCallback, check_callbacks, raise_if_cancelled, step_progress
from .registry import DEFAULT_MODEL, LoadedModel, ModelEntry
from .registry import list_models as _list_models
from .registry import load_model as _load_model
from .settings import DEFAULT_OVERLAP, FinetuneSettings

if TYPE_CHECKING:
    from .finetune import FinetuneResult
    from .inference import Segmentation
    from .metrics_report import Report

ModelLike = Union[str, Path, LoadedModel]
ArrayOrPath = Union[np.ndarray, str, Path]
_FT = FinetuneSettings()  # the fine-tuning defaults, written once in settings.py


def load_model(name_or_path: str | Path = DEFAULT_MODEL, *, device: str = "auto", mode: str | None = None) -> LoadedModel:
    """Load a model, ready to segment, by name or from a ``.safetensors`` file.

    Parameters
    ----------
    name_or_path : str or Path, default ``"efficientnet-unet-glands"``
        A bundled or user model name (see :func:`list_models`) or the path of a model file.
    device : str, default ``"auto"``
        ``"auto"`` (CUDA, then Apple MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    mode : {None, "accurate", "fast"}
        Inference mode of architectures that have several (U-Net++: ``"accurate"`` averages its
        heads, ``"fast"`` uses one pruned head); None keeps the model's own.

    Returns
    -------
    LoadedModel
        ``network`` (eval mode, on ``device``), ``config`` (:class:`ModelConfig`: task, working
        scale, default tile and minimum object size, training record) and ``device``.

    Raises
    ------
    GlasSegError
        Unknown name, damaged file, unavailable device, a mode the architecture does not have.
    """
    return _load_model(name_or_path, device, mode=mode)


def list_models(*, task: str | None = None, source: str | None = None) -> list[ModelEntry]:
    """The models glas-seg can use: bundled ones first, then the user's, each sorted by name.

    Reads only the files' headers (fast, no torch).

    Parameters
    ----------
    task : {None, "glands", "nuclei"}
        Only models for this task.
    source : {None, "bundled", "user"}
        Only models from this place.

    Returns
    -------
    list of ModelEntry
        ``name``, ``path``, ``source``, ``config``; ``entry.validation_score`` is the model's
        validation object F1 pooled over its validation images (None when not validated).
    """
    if task not in (None, "glands", "nuclei"):
        raise GlasSegError(f"task must be 'glands', 'nuclei' or None, not {task!r}")
    if source not in (None, "bundled", "user"):
        raise GlasSegError(f"source must be 'bundled', 'user' or None, not {source!r}")
    return [e for e in _list_models() if (task is None or e.config.task == task)
            and (source is None or e.source == source)]


def _as_model(model: ModelLike, device: str, mode: str | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        if mode is not None:
            raise GlasSegError("mode applies when a model is loaded: pass it to load_model(), or pass the model's name")
        if device not in (None, "auto"):
            from .registry import pick_device

            if pick_device(device) != model.device:
                raise GlasSegError(f"The model is loaded on {model.device}, not {device}; "
                                   "load it with load_model(..., device=...) or pass its name")
        return model
    if isinstance(model, (str, Path)):
        return _load_model(model, device, mode=mode)
    raise GlasSegError(f"model must be a model name, a .safetensors path or a loaded model, not {type(model).__name__}")


def segment(
    image: np.ndarray,
    model: ModelLike = DEFAULT_MODEL,
    *,
    device: str = "auto",
    mode: str | None = None,
    tile_size: int | None = None,
    overlap: float = DEFAULT_OVERLAP,
    tta: bool = False,
    min_size: int | None = None,
    mask_glass: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelToken = None,
) -> "Segmentation":
    """Segment one 2D H&E image into instances (glands or nuclei, after the model's task).

    The image is resampled to the model's working scale, predicted tile by tile (overlapping
    tiles blended), and split into instances (watershed from confident interiors, or the
    detections of an instance network stitched across tiles); labels come back at the
    image's size.

    Parameters
    ----------
    image : ndarray, shape ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``
        uint8, uint16 (8 or 12 bits in 16), bool or float (``[0, 1]`` or ``[0, 255]``); grey
        is repeated to RGB, alpha dropped. At least 16 pixels a side. Stacks: segment one plane
        at a time.
    model : str, Path or LoadedModel, default ``"efficientnet-unet-glands"``
        A model name (see :func:`list_models`), a ``.safetensors`` path, or a model returned by
        :func:`load_model` (load once when segmenting many images: a name is loaded each call).
    device : str, default ``"auto"``
        Where to load a model given by name or path; a loaded model runs where it is.
    mode : {None, "accurate", "fast"}
        Inference mode for a model given by name (U-Net++ only).
    tile_size : int, optional
        Tile side in pixels at the model's working scale (default: the model's, 384 for
        U-Net). Smaller tiles use less memory.
    overlap : float in ``[0, 0.9]``, default 0.25
        Fraction of a tile shared with its neighbour.
    tta : bool, default False
        Average the prediction over flips (about 3x slower, slightly better); not available for
        instance networks (Mask R-CNN).
    min_size : int, optional
        Smallest object kept, in pixels of ``image`` (default: the model's, 400 for glands).
    mask_glass : bool, default True
        Treat blank glass reaching the image border as background, and show the network
        mirrored tissue there (glands at a tissue edge are otherwise lost; docs/models.md).
    progress : callable ``progress(done, total)``, optional
        Called after each batch of tiles (see docs/progress.md).
    cancel : threading.Event or callable returning bool, optional
        Checked between batches of tiles; :class:`Cancelled` is raised when it is set.

    Returns
    -------
    Segmentation
        ``labels``: int32 ``(H, W)`` instance ids, 0 background, 1..N objects;
        ``probabilities``: float32 ``(C, h, w)`` class probabilities at the working scale
        (channel 0 background); ``foreground``: float32 ``(h, w)``.

    Raises
    ------
    GlasSegError
        Bad image (shape, NaN, too small), bad options, unknown model.
    Cancelled
        ``cancel`` was set.

    Examples
    --------
    >>> import glas_seg
    >>> image = glas_seg.read_image("slide.png")                 # doctest: +SKIP
    >>> result = glas_seg.segment(image, "unet-glands")          # doctest: +SKIP
    >>> result.labels.max()                                      # number of glands  # doctest: +SKIP
    """
    if not isinstance(image, np.ndarray):
        if isinstance(image, (str, Path)):
            raise GlasSegError("segment() takes an image array; read the file with glas_seg.read_image() first")
        image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise GlasSegError(f"Expected a 2D grey, RGB or RGBA image, got shape {image.shape}; segment stacks plane by plane")
    if tile_size is not None and (int(tile_size) != tile_size or tile_size < 16):
        raise GlasSegError(f"tile_size must be an integer of at least 16, not {tile_size!r}")
    if not 0 <= overlap <= 0.9:
        raise GlasSegError(f"overlap must be between 0 and 0.9, not {overlap!r}")
    if min_size is not None and (int(min_size) != min_size or min_size < 0):
        raise GlasSegError(f"min_size must be a non-negative integer, not {min_size!r}")
    check_callbacks(progress, cancel)
    loaded = _as_model(model, device, mode)
    from .inference import predicts_instances
    from .inference import segment as _segment

    if tta and predicts_instances(loaded):
        raise GlasSegError(f"tta does not apply to {loaded.config.architecture} models (they detect instances directly)")
    return _segment(loaded, image, min_size=min_size, mask_glass=mask_glass, tile_size=tile_size,
                    overlap=overlap, tta=tta, progress=progress, cancel=cancel)


def _label_map(value: ArrayOrPath, what: str) -> np.ndarray:
    if isinstance(value, (str, Path)):
        from .image_io import read_labels

        return read_labels(value)
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise GlasSegError(f"{what} must be an integer label map, got dtype {array.dtype}")
    return array


def _pairs(first, second, what: tuple[str, str]) -> tuple[list, list, bool]:
    """Normalise one pair or two equally long sequences into two lists; whether it was one."""
    single = isinstance(first, (np.ndarray, str, Path))
    if single != isinstance(second, (np.ndarray, str, Path)):
        raise GlasSegError(f"Give one {what[0]} and one {what[1]}, or two lists of the same length")
    firsts, seconds = ([first], [second]) if single else (list(first), list(second))
    if len(firsts) != len(seconds):
        raise GlasSegError(f"{len(firsts)} {what[0]}s but {len(seconds)} {what[1]}s: give them in pairs")
    if not firsts:
        raise GlasSegError(f"No {what[0]}s given")
    return firsts, seconds, single


def evaluate(
    predicted: ArrayOrPath | Sequence[ArrayOrPath],
    ground_truth: ArrayOrPath | Sequence[ArrayOrPath],
    *,
    probabilities: np.ndarray | Sequence[np.ndarray] | None = None,
    names: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken = None,
) -> "Report":
    """Score predicted instance label maps against ground truth with the GlaS metrics.

    Object F1 (a detection needs more than 50 % overlap), object Dice and object Hausdorff as
    the GlaS 2015 challenge defines them, plus pixel precision / recall / F1 / IoU; see
    docs/metrics.md for every choice made.

    Parameters
    ----------
    predicted, ground_truth : ndarray or path, or sequences of them
        Integer label maps, 0 background, ``(H, W)`` (or ``(..., H, W)`` stacks, whose planes
        are pooled), the same shape pairwise; or label-map files (read as
        :func:`glas_seg.read_image` does). One pair, or two lists of the same length.
    probabilities : ndarray or sequence of ndarray, optional
        Foreground probability per pixel, same shapes, for the ROC curve and its AUC.
    names : sequence of str, optional
        Row names (default: ``image_1``, ``image_2``..., or the file stems).
    progress : callable ``progress(done, total)``, optional
        Called after each pair.
    cancel : threading.Event or callable returning bool, optional
        Checked between pairs; :class:`Cancelled` is raised when it is set.

    Returns
    -------
    Report
        ``pooled``: metrics over all pairs as the challenge pools a test part (TP/FP/FN summed,
        objects weighted by area over the whole set), the number ``glas-seg models`` quotes;
        ``mean_per_image``: the mean of the rows; ``images``: one result per pair with its
        ``row`` of metrics; ``to_dict()`` for JSON.

    Raises
    ------
    GlasSegError
        Pairs of different shapes, non-integer labels, unequal list lengths.
    Cancelled
    """
    check_callbacks(progress, cancel)
    preds, gts, single = _pairs(predicted, ground_truth, ("prediction", "ground truth"))
    if probabilities is None:
        probs = [None] * len(preds)
    else:
        probs = [probabilities] if single else list(probabilities)
        if len(probs) != len(preds):
            raise GlasSegError(f"{len(probs)} probability maps for {len(preds)} predictions")
    if names is None:
        names = [Path(p).stem if isinstance(p, (str, Path)) else f"image_{i}" for i, p in enumerate(preds, start=1)]
    names = [str(n) for n in names]
    if len(names) != len(preds):
        raise GlasSegError(f"{len(names)} names for {len(preds)} predictions")
    if len(set(names)) != len(names):
        raise GlasSegError("Row names must be unique")
    from .metrics_report import score_set

    def items():
        for name, pred, gt, prob in zip(names, preds, gts, probs):
            raise_if_cancelled(cancel)
            pred, gt = _label_map(pred, f"prediction {name}"), _label_map(gt, f"ground truth {name}")
            if pred.shape != gt.shape:
                raise GlasSegError(f"{name}: prediction {pred.shape} and ground truth {gt.shape} differ in shape")
            yield (name, pred, gt) if prob is None else (name, pred, gt, np.asarray(prob))

    return score_set(items(), progress=progress, total=len(preds))


def finetune(
    images: ArrayOrPath | Sequence[ArrayOrPath],
    labels: ArrayOrPath | Sequence[ArrayOrPath],
    name: str,
    *,
    base: str | Path = DEFAULT_MODEL,
    masks: Sequence[np.ndarray] | None = None,
    iterations: int = _FT.iterations,
    learning_rate: float | None = _FT.learning_rate,
    batch_size: int = _FT.batch_size,
    crop_size: int = _FT.crop_size,
    augment: bool = _FT.augment,
    augment_strength: float = _FT.augment_strength,
    layers: str = _FT.layers,
    l2sp: float = _FT.l2sp,
    val_fraction: float = _FT.val_fraction,
    eval_every: int = _FT.eval_every,
    patience: int = _FT.patience,
    freeze_norm: bool = _FT.freeze_norm,
    calibrate: bool | None = _FT.calibrate,
    optimizer: str = _FT.optimizer,
    replay_images=None,
    replay_labels=None,
    replay_share: float = _FT.replay_share,
    seed: int = _FT.seed,
    device: str = _FT.device,
    description: str = "",
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    on_event: Callable[[dict], None] | None = None,
    cancel: CancelToken = None,
) -> "FinetuneResult":
    """Fine-tune a model on a few corrected images and save it as a user model.

    The new model appears in :func:`list_models`, ``glas-seg models`` and the napari Segment
    widget under ``name``; the base model's file is only read. See docs/finetuning.md.

    Parameters
    ----------
    images : ndarray or path, or a sequence of them
        2D images ``(H, W[, 3 or 4])``, any dtype :func:`segment` takes, or image files.
    labels : ndarray or path, or a sequence of them
        The corrected instance label maps, int ``(H, W)``, one per image, or label files.
    name : str
        Name of the new user model (1-64 letters, digits, ``.``, ``_``, ``+``, ``-``); checked
        before training starts.
    base : str or Path, default ``"efficientnet-unet-glands"``
        Name or file of the model to start from.
    masks : sequence of bool ndarray ``(H, W)``, optional
        Per image, where its labels were corrected; the loss ignores the rest.
    iterations : int
        Optimizer steps, each on ``batch_size`` random crops. The defaults of this and the
        following options are :class:`FinetuneSettings`' (chosen by the benchmark in
        docs/finetuning.md).
    learning_rate : float or None
        Peak learning rate (AdamW, short warm-up, cosine decay); None: 3e-4 when only the head
        trains, 3e-5 otherwise.
    batch_size, crop_size : int
        Crops per step and their side, in pixels at the model's working scale.
    augment : bool, default True
        Random flips, rotations, elastic, colour and stain jitter.
    augment_strength : float in ``[0, 2]``
        Scale of those transforms (1: as the bundled models were trained).
    layers : {"auto", "all", "decoder", "head", "none"}
        Which parameters train: all, everything but the encoder, or the output layer(s) only;
        "auto": all when the corrected images hold 100 objects or more, else the head;
        "none": no weights change (with ``calibrate``: only the thresholds are chosen).
    l2sp : float
        Pull towards the base model's weights (L2-SP; 0 turns it off).
    val_fraction : float in ``[0, 0.9]``, default 0
        Share of the images held out and scored before and after (0: train on all, no scores).
    eval_every : int
        Score the held-out images every this many iterations.
    patience : int
        With held-out images: stop after this many scorings without a better object F1; the
        best-scoring checkpoint is kept either way (0: never stop early).
    freeze_norm : bool, default True
        Keep the base model's batch-norm statistics (see docs/finetuning.md).
    calibrate : bool or None
        After training, choose the watershed's interior and foreground thresholds that
        segment the corrected images best (a few seconds per image; pixel classifiers only);
        None: only with ``layers="none"``.
    optimizer : {"adamw", "sgd"}
        AdamW, or SGD with momentum 0.9.
    replay_images, replay_labels : sequence of ndarray or path, optional
        Annotated images of the data the base model was trained on, mixed into training
        (``replay_share`` of the crops) so that it keeps that domain in every batch.
    replay_share : float in ``[0, 0.95]``
    seed : int, default 0
    device : str, default ``"auto"``
    description : str
        Stored with the model (what the data was).
    overwrite : bool, default False
        Replace an existing user model called ``name``.
    progress : callable ``progress(done, total)``, optional
        Called after each optimizer step (``total`` = ``iterations``).
    on_event : callable ``on_event(dict)``, optional
        Called after each step with ``iteration``, ``total``, ``loss``, ``lr`` and, where
        measured, the validation metrics (``object_f1``, ``object_f1_pooled``, ``pixel_dice``...).
    cancel : threading.Event or callable returning bool, optional
        Checked every step; :class:`Cancelled` is raised and no model is written.

    Returns
    -------
    FinetuneResult
        ``entry`` (the new :class:`ModelEntry`), ``history``, ``before`` / ``after`` validation
        metrics (None without held-out images), ``wall_seconds``.

    Raises
    ------
    GlasSegError
        Bad or taken name, unknown base model, images and labels that do not pair up.
    Cancelled
    """
    check_callbacks(progress, cancel)
    if on_event is not None and not callable(on_event):
        raise GlasSegError("on_event must be a callable taking one dict")
    image_list, label_list, _ = _pairs(images, labels, ("image", "label map"))
    if masks is not None:
        masks = [np.asarray(m, dtype=bool) for m in masks]
        if len(masks) != len(image_list):
            raise GlasSegError(f"{len(masks)} masks for {len(image_list)} images: give one per image")
    settings = FinetuneSettings(iterations=iterations, learning_rate=learning_rate, batch_size=batch_size,
                                crop_size=crop_size, augment=augment, augment_strength=augment_strength,
                                layers=layers, l2sp=l2sp, val_fraction=val_fraction, eval_every=eval_every,
                                patience=patience, freeze_norm=freeze_norm, calibrate=calibrate, seed=seed,
                                device=device, optimizer=optimizer, replay_share=replay_share)
    if (replay_images is None) != (replay_labels is None):
        raise GlasSegError("give replay_images and replay_labels together")
    if not isinstance(base, (str, Path)):
        raise GlasSegError(f"base must be a model name or a .safetensors path, not {type(base).__name__}")
    from .finetune import finetune as _finetune
    from .finetune import samples_from_arrays
    from .image_io import read_image

    def to_samples(image_list, label_list, prefix: str) -> list:
        samples = []
        for index, (image, label) in enumerate(zip(image_list, label_list), start=1):
            sample_name = Path(image).stem if isinstance(image, (str, Path)) else f"{prefix}_{index}"
            image = read_image(image) if isinstance(image, (str, Path)) else np.asarray(image)
            label = _label_map(label, f"labels of {sample_name}")
            if image.ndim not in (2, 3) or label.ndim != 2:
                raise GlasSegError(f"{sample_name}: give 2D images (H, W[, C]) and 2D label maps (H, W)")
            found, _ = samples_from_arrays(sample_name, image, label, rgb=image.ndim == 3)
            if not found:
                raise GlasSegError(f"{sample_name}: its label map holds no objects; nothing to learn from")
            samples += found
        return samples

    samples = to_samples(image_list, label_list, "image")
    replay = None
    if replay_images is not None:
        replay = to_samples(*_pairs(replay_images, replay_labels, ("replay image", "replay label map"))[:2], "replay")
    if masks is not None and any(m.shape != s.labels.shape for m, s in zip(masks, samples)):
        raise GlasSegError("Each mask must have its image's height and width")
    progress_events = step_progress(progress)

    def events(event: dict) -> None:
        if progress_events is not None:
            progress_events(event)
        if on_event is not None and "iteration" in event:  # the step events this callback has always had
            on_event(event)

    return _finetune(str(base), samples, name, settings, valid_masks=masks, description=description,
                     overwrite=overwrite, progress=events, cancel=cancel, replay=replay)


__all__ = ["segment", "load_model", "list_models", "evaluate", "finetune"]
