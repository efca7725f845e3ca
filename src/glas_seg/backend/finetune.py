"""Fine-tuning a model on a few corrected images: one function for the widget and the CLI.

The user corrects a model's labels on a few images (optionally only inside rectangles), and
:func:`finetune` continues training the base model on them with CPU-friendly defaults, then
adds the result to the user model store (:mod:`.model_store`). The base model file is only
read; the run's checkpoints live in a temporary folder that is removed whatever happens, so
a cancelled or failed run leaves nothing behind.
"""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Sequence

import numpy as np
import torch
from skimage.draw import polygon as draw_polygon
from skimage.draw import polygon_perimeter as draw_polygon_perimeter

from . import model_store
from .checkpoint import config_replace, load_state
from .data import Sample, find_pairs, load_sample
from .errors import GlasSegError
from .calibrate import FINETUNE_MIN_SIZE_FACTORS, calibrate_thresholds, min_size_grid
from .image_io import to_float_rgb
from .inference import predicts_instances
from .models import get_architecture
from .progress import Cancelled, is_cancelled as _should_stop
from .labelmaps import bounding_box
from .registry import LoadedModel, ModelEntry, build_network, find_model, pick_device
from .settings import FinetuneSettings  # noqa: F401 (defined without torch, for the CLI and API)
from .stacks import all_planes, leading_shape
from .threads import use_torch_threads
from .training import TrainSettings, evaluate, rounded_metrics, train


@dataclass
class FinetuneResult:
    """What a finished fine-tune produced (holds no tensors, so no memory is kept alive).

    Attributes
    ----------
    entry : ModelEntry
        The new user model.
    history : list of dict
        Per iteration ``iteration`` and ``loss``; validation metrics where measured.
    before, after : dict or None
        Validation metrics of the base and the new model (None without validation images):
        ``object_f1`` (mean per image), ``object_f1_pooled``, ``object_dice``, ``pixel_dice``...
    train_names, val_names : list of str
    wall_seconds : float
    best_iteration : int or None
        With validation: the iteration whose weights were kept (the best validation object F1);
        0 when no checkpoint beat the base model, whose weights are then kept.
    stopped_early : bool
        Validation stopped improving and the run ended before ``iterations``.
    layers : str
        The layers that trained (``"auto"`` decided, :meth:`FinetuneSettings.resolve`).
    learning_rate : float
        The peak learning rate used.
    thresholds : dict or None
        ``interior_threshold`` and ``foreground_threshold`` of the new model and ``chosen``
        (whether they were chosen on the corrected images and kept), when calibration ran.
    """

    entry: ModelEntry
    history: list = field(default_factory=list)
    before: dict | None = None
    after: dict | None = None
    train_names: list = field(default_factory=list)
    val_names: list = field(default_factory=list)
    wall_seconds: float = 0.0
    best_iteration: int | None = None
    stopped_early: bool = False
    layers: str = ""
    learning_rate: float = 0.0
    thresholds: dict | None = None


# -- building training samples -------------------------------------------------------------------
def masks_from_polygons(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise polygons (rectangles are 4-corner polygons) into one boolean mask.

    Parameters
    ----------
    polygons : sequence of ndarray, each ``(N, 2)`` row/column vertices in pixel coordinates
    shape : (int, int)

    Returns
    -------
    ndarray of bool, ``shape``; True inside any polygon (borders included).
    """
    mask = np.zeros(shape, dtype=bool)
    for vertices in polygons:
        vertices = np.asarray(vertices, dtype=float)
        if vertices.ndim != 2 or vertices.shape[1] != 2 or len(vertices) < 3:
            raise GlasSegError("Regions must be polygons or rectangles with 2D vertices")
        rr, cc = draw_polygon(vertices[:, 0], vertices[:, 1], shape=shape)
        mask[rr, cc] = True
        # The interior alone leaves out pixels on the outline (napari draws a rectangle's edges
        # through pixel centres); the user drew them inside the region, so include them.
        rr, cc = draw_polygon_perimeter(vertices[:, 0], vertices[:, 1])
        inside = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        mask[rr[inside], cc[inside]] = True
    return mask


def samples_from_arrays(
    name: str,
    image: np.ndarray,
    labels: np.ndarray,
    rgb: bool,
    regions: Sequence[np.ndarray] | None = None,
) -> tuple[list[Sample], list[np.ndarray] | None]:
    """Training samples from an image (2D or a stack) and its corrected labels.

    Parameters
    ----------
    name : str
        Used to name the samples (``name`` or ``name[z]`` for plane ``z`` of a stack).
    image : ndarray ``(..., H, W[, C])``
    labels : ndarray of int ``(..., H, W)`` with the same leading (stack) shape
    rgb : bool
        Whether the image's last axis is colour.
    regions : sequence of ndarray, optional
        Polygons ``(N, labels.ndim)`` in the labels' pixel coordinates; the leading coordinates
        of a polygon's first vertex pick its plane. When given, only planes with a region inside
        the image are used, and only inside the regions; otherwise every plane holding any label.

    Returns
    -------
    samples : list of Sample
        Copies; the input arrays are never modified.
    masks : list of bool ndarray or None
        Per sample, where its labels are trusted (None without ``regions``).
    """
    image, labels = np.asarray(image), np.asarray(labels)
    stack = leading_shape(image.shape, rgb)
    plane_shape = image.shape[len(stack) : len(stack) + 2]
    if labels.shape != stack + tuple(plane_shape):
        raise GlasSegError(
            f"{name}: labels of shape {labels.shape} do not match the image "
            f"({image.shape}{', RGB' if rgb else ''}); expected {stack + tuple(plane_shape)}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise GlasSegError(f"{name}: labels must hold integers, got {labels.dtype}")
    by_plane: dict[tuple, list[np.ndarray]] = {}
    if regions is not None:
        for vertices in regions:
            vertices = np.asarray(vertices, dtype=float)
            if vertices.ndim != 2 or vertices.shape[1] != labels.ndim:
                raise GlasSegError(f"{name}: a region has {vertices.shape[-1]}-D vertices, the labels are {labels.ndim}-D")
            plane = tuple(int(round(v)) for v in vertices[0, : len(stack)])
            if all(0 <= p < n for p, n in zip(plane, stack)):
                by_plane.setdefault(plane, []).append(vertices[:, len(stack) :])
    samples, masks = [], []
    for plane in all_planes(image.shape, rgb):
        if regions is not None and plane not in by_plane:
            continue
        plane_labels = labels[plane]
        if regions is None and not plane_labels.any():
            continue
        mask = masks_from_polygons(by_plane[plane], plane_labels.shape) if regions is not None else None
        if mask is not None and not mask.any():
            continue  # all of this plane's regions lie outside the image
        label = name if not stack else f"{name}[{','.join(map(str, plane))}]"
        samples.append(Sample(label, to_float_rgb(image[plane]), np.array(plane_labels, dtype=np.int32, copy=True)))
        if mask is not None:
            masks.append(mask)
    return samples, (masks if regions is not None else None)


def samples_from_folders(images_dir, labels_dir=None) -> list[Sample]:
    """Load image/label pairs matched by file name (see :func:`.data.find_pairs`)."""
    pairs = find_pairs(images_dir, labels_dir)
    if not pairs:
        where = f"{images_dir}" + (f" and {labels_dir}" if labels_dir else "")
        raise GlasSegError(f"No image/label pairs found in {where} (labels named like the image, "
                         "or X.png with X_anno.png / X_labels.tif)")
    return [load_sample(*pair) for pair in pairs]


def _split(samples, masks, val_fraction: float, seed: int):
    """(training samples, their masks, held-back samples, their masks) for a validation share."""
    n = len(samples)
    if val_fraction > 0 and n < 2:
        raise GlasSegError("holding images back to validate needs at least 2 corrected images (one of them still "
                           "trains): add another image or set the validation share to 0")
    n_val = 0 if val_fraction <= 0 else min(n - 1, max(1, round(n * val_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    train = [samples[i] for i in train_idx]
    train_masks = [masks[i] for i in train_idx] if masks is not None else None
    held = [_restrict(samples[i], masks[i] if masks is not None else None) for i in val_idx]
    return train, train_masks, [sample for sample, _ in held], [mask for _, mask in held]


def _restrict(sample: Sample, mask: np.ndarray | None) -> tuple[Sample, np.ndarray | None]:
    """A held-back sample cut to the bounding box of its corrected region, and the region in that box.

    Objects are then scored only inside the region (:func:`.training.evaluate`): outside it the
    labels were never corrected, so a gland found there is neither right nor wrong.
    """
    if mask is None:
        return sample, None
    box = bounding_box(mask)
    if min(box[0].stop - box[0].start, box[1].stop - box[1].start) < 32:
        raise GlasSegError(f"{sample.name}: its corrected region is too small to validate on (under 32 pixels a side); "
                         "set the validation share to 0 or draw larger regions")
    labels = np.where(mask, sample.labels, 0)[box]
    return Sample(sample.name, sample.image[box], labels), mask[box]


# -- fine-tuning ---------------------------------------------------------------------------------
def finetune(
    base: str,
    samples: Sequence[Sample],
    name: str,
    settings: FinetuneSettings | None = None,
    valid_masks: Sequence[np.ndarray] | None = None,
    val_samples: Sequence[Sample] | None = None,
    description: str = "",
    overwrite: bool = False,
    progress: Callable[[dict], None] | None = None,
    cancel=None,
    replay: Sequence[Sample] | None = None,
) -> FinetuneResult:
    """Fine-tune ``base`` on corrected samples and add the result to the user model store.

    Parameters
    ----------
    base : str
        Name or path of the starting model (bundled or user); its file is only read.
    samples : sequence of Sample
        Images (float RGB in [0, 1]) with their corrected instance labels, full resolution.
    name : str
        Name of the new user model; checked before training starts.
    settings : FinetuneSettings, optional
    valid_masks : sequence of bool ndarray, optional
        Per sample, where its labels were corrected; the loss ignores everything else.
    val_samples : sequence of Sample, optional
        Validation images; by default ``settings.val_fraction`` of ``samples`` is held out.
    description : str
        Free text stored with the model (what the data was).
    overwrite : bool
        Replace an existing user model called ``name``.
    progress : callable(dict), optional
        Called with ``{"iteration", "total", "loss", "lr", "elapsed"}`` after every step
        (``elapsed``: seconds since the run started), plus validation metrics (``object_f1``,
        ``pixel_dice``...) where measured and ``stopped_early`` on the last step of a run that
        stopped early; once with ``iteration`` 0 and the base model's metrics before training
        when there is validation. The work before and after training reports
        ``{"phase", "done", "total", "elapsed"}`` per image (``phase``: what it is doing, e.g.
        ``"choosing thresholds"``); such events have no ``iteration``.
    cancel : threading.Event or callable, optional
        Checked every step and before saving; :class:`.inference.Cancelled` is raised and
        nothing is written to the store.
    replay : sequence of Sample, optional
        Annotated images of the data the base model was trained on, mixed into training
        (``settings.replay_share`` of the crops) so that it does not forget that domain. They
        are not held back, not scored and not used to choose thresholds; "auto" layers count
        only the corrected images' objects.

    Returns
    -------
    FinetuneResult

    Raises
    ------
    ValueError
        Bad name, unknown base model, no samples, shapes that do not fit.
    Cancelled
    """
    settings = settings or FinetuneSettings()
    model_store.check_new_name(name, overwrite)
    samples = list(samples)
    if not samples:
        raise GlasSegError("Nothing to fine-tune on: give at least one image with corrected labels")
    if valid_masks is not None:
        valid_masks = [np.asarray(m, dtype=bool) for m in valid_masks]
        if len(valid_masks) != len(samples) or any(m.shape != s.labels.shape for m, s in zip(valid_masks, samples)):
            raise GlasSegError("Give one region mask per image, each of the image's height and width")
    base_entry = find_model(base)
    target = model_store.model_path(name)
    if overwrite and target.exists() and os.path.samefile(target, base_entry.path):
        raise GlasSegError(f"{name!r} is the base model: a fine-tune never replaces the model it starts from; "
                           "give the new model another name")
    state, base_config = load_state(base_entry.path)
    if val_samples is None:
        train_samples, train_masks, val, val_masks = _split(samples, valid_masks, settings.val_fraction, settings.seed)
    else:
        train_samples, train_masks, val, val_masks = samples, valid_masks, list(val_samples), None

    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    config = config_replace(
        base_config, name=name, base_model=base_entry.name,
        description=description or f"{base_entry.name} fine-tuned on {len(train_samples)} corrected image(s)",
        training={"created": created, "fine_tuned_from": base_entry.name},
    )
    n_objects = count_objects(train_samples, train_masks)
    layers, learning_rate = settings.resolve(n_objects)
    replay = list(replay or [])
    fit_samples, fit_masks, draw_weights = _with_replay(train_samples, train_masks, replay, settings.replay_share)
    if get_architecture(base_config.architecture).predicts_instances and (settings.calibrate or layers == "none"):
        raise GlasSegError(f"{base_entry.name} detects objects directly: it has no watershed thresholds to choose "
                           "(leave calibration off and train some layers)")
    train_settings = None if layers == "none" else TrainSettings(
        iterations=settings.iterations, eval_every=settings.eval_every if val else settings.iterations,
        batch_size=settings.batch_size, crop_size=settings.crop_size, learning_rate=learning_rate,
        warmup=min(20, max(1, settings.iterations // 10)), augment=settings.augment, seed=settings.seed,
        device=settings.device, freeze_norm=settings.freeze_norm, layers=layers, l2sp=settings.l2sp,
        augment_strength=settings.augment_strength, patience=settings.patience if val else 0,
        optimizer=settings.optimizer,
        # In the process, on a GPU too: a few images need no worker processes, and forking the
        # napari process (Qt, other threads) from the widget's worker thread is not safe.
        loader_workers=0,
    )
    history: list[dict] = []
    started = time.perf_counter()

    def record(event: dict) -> None:
        event = {**event, "elapsed": time.perf_counter() - started}
        history.append({k: v for k, v in event.items() if k != "total"})
        if progress is not None:
            progress(event)

    def phase(name: str):
        """Progress of the work around training (scoring held-back images, choosing thresholds):
        ``{"phase", "done", "total", "elapsed"}``, not part of the training history."""
        def report(done: int, total: int) -> None:
            if progress is not None:
                progress({"phase": name, "done": int(done), "total": int(total),
                          "elapsed": time.perf_counter() - started})
        return report

    device = pick_device(settings.device)
    if device.type == "cpu":
        use_torch_threads()  # physical cores not busy elsewhere (backend/threads.py)
    before = after = best_iteration = None
    network = loaded = None
    try:
        if val:
            network = build_network(base_config, state, base_entry.path.name)
            before = evaluate(LoadedModel(network.to(device).eval(), base_config, device), val, val_masks, cancel,
                              progress=phase("scoring the base model"))
            network = None
            record({"iteration": 0, "total": settings.iterations, **before})
        if layers == "none":
            loaded = LoadedModel(build_network(config, state, base_entry.path.name).to(device).eval(), config, device)
        else:
            with tempfile.TemporaryDirectory(prefix="glas-seg-finetune-") as run_dir:
                loaded, _ = train(config, train_settings, fit_samples, val, run_dir, init_state=state,
                                  valid_masks=fit_masks, progress=record, cancel=cancel, val_masks=val_masks,
                                  sample_weights=draw_weights)
                if val:  # keep the checkpoint the user's held-back images liked best, not the last
                    best_iteration, after = _best_validation(history, before)
                    # Iteration 0 is the base model: when no checkpoint beat it, its weights are kept.
                    weights = state if best_iteration == 0 else load_state(Path(run_dir) / "best.safetensors")[0]
                    loaded.network.load_state_dict(weights)
        calibration = thresholds = None
        if settings.resolve_calibrate(layers) and not predicts_instances(loaded):
            loaded.network.eval()
            sizes = min_size_grid(config.min_size, FINETUNE_MIN_SIZE_FACTORS) if settings.calibrate_min_size else ()
            calibration = calibrate_thresholds(loaded, [s.image for s in train_samples],
                                               [s.labels for s in train_samples], masks=train_masks,
                                               min_sizes=sizes, progress=phase("choosing thresholds"), cancel=cancel)
            chosen = calibration.changed
            if chosen:
                tuned = config_replace(config, interior_threshold=calibration.interior_threshold,
                                       foreground_threshold=calibration.foreground_threshold,
                                       min_size=calibration.min_size)
                if val:  # the user's held-back images decide, as they do for the weights
                    reference = after if after is not None else before
                    scored = evaluate(LoadedModel(loaded.network, tuned, device), val, val_masks, cancel,
                                      progress=phase("scoring the thresholds"))
                    chosen = scored["object_f1"] >= reference["object_f1"]
                    after = scored if chosen else reference
                if chosen:
                    config = tuned
            thresholds = {"interior_threshold": config.interior_threshold,
                          "foreground_threshold": config.foreground_threshold, "min_size": config.min_size,
                          "chosen": chosen}
        if layers == "none" and val and after is None:
            after = before  # the base weights with the base thresholds
        if _should_stop(cancel):
            raise Cancelled()
        wall = time.perf_counter() - started
        training = {
            "created": created,
            "fine_tuned_from": base_entry.name,
            "data": description or "corrected labels",
            "train_images": [s.name for s in train_samples],
            "val_images": [s.name for s in val],
            "corrected_regions_only": train_masks is not None,
            "replay_images": [s.name for s in fit_samples[len(train_samples):]] if layers != "none" else [],
            "iterations": 0 if layers == "none" else history[-1]["iteration"] if history else settings.iterations,
            "best_iteration": best_iteration,
            "settings": asdict(settings),
            "layers": layers,
            "learning_rate": learning_rate,
            "corrected_objects": n_objects,
            "device": str(device),
            "wall_seconds": round(wall, 1),
            "calibration": None if calibration is None else {
                **thresholds, "best_on_train_images": [calibration.interior_threshold, calibration.foreground_threshold,
                                                      calibration.min_size],
                "on_train_images_before": calibration.before, "on_train_images_after": calibration.after},
            "validation_before": rounded_metrics(before),
            "validation": rounded_metrics(after),
        }
        entry = model_store.save_user_model(loaded.network, config_replace(config, training=training), overwrite)
    finally:
        # Drop every reference to the networks and optimizer before returning, so that their
        # memory (GPU memory included) is given back now, not when the viewer closes.
        del network, loaded, state
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return FinetuneResult(entry, history, before, after, [s.name for s in train_samples], [s.name for s in val],
                          time.perf_counter() - started, best_iteration,
                          any(e.get("stopped_early") for e in history), layers, learning_rate, thresholds)


def _with_replay(samples: list[Sample], masks: list[np.ndarray] | None, replay: list[Sample], share: float):
    """(training samples, their masks, their draw weights) with the replay images appended.

    The corrected images share ``1 - share`` of the draws equally, the replay images ``share``;
    replay images count as corrected everywhere. Without replay: the inputs and uniform draws.
    """
    if not replay or share <= 0:
        return samples, masks, None
    if masks is not None:
        masks = [*masks, *(np.ones(s.labels.shape, bool) for s in replay)]
    weights = [(1 - share) / len(samples)] * len(samples) + [share / len(replay)] * len(replay)
    return [*samples, *replay], masks, weights


def count_objects(samples: Sequence[Sample], masks: Sequence[np.ndarray] | None = None) -> int:
    """Objects (distinct ids) in the samples' labels, only inside the masks when given."""
    total = 0
    for i, sample in enumerate(samples):
        labels = sample.labels if masks is None else sample.labels[masks[i]]
        total += int(np.count_nonzero(np.unique(labels)))
    return total


def _best_validation(history: list[dict], before: dict) -> tuple[int, dict]:
    """Iteration and metrics of the best validation (highest object F1; the earliest on ties).

    The base model (iteration 0) competes too: a fine-tune that never beats it on the user's
    held-back images keeps the base weights, so the result is never worse there (thresholds
    chosen afterwards are kept only when they do not lower that score either). Among the
    checkpoints the rule is training's ``best.safetensors`` one, so the metrics match the weights.
    """
    scored = [{"iteration": 0, **before}] + [e for e in history if e["iteration"] > 0 and "object_f1" in e]
    best = max(scored, key=lambda e: e["object_f1"])  # max() keeps the first of equal values
    return best["iteration"], {k: best[k] for k in before if k in best}


#: The numbers reported before / after on the held-back images: (key, label).
REPORTED_METRICS = (("object_f1_pooled", "object F1"), ("object_dice", "object Dice"), ("pixel_dice", "pixel Dice"))


def format_before_after(result: FinetuneResult) -> str:
    """One line comparing the base and the new model on the held-back images ("" without any).

    Object F1 and object Dice are pooled over all objects of the held-back images (as
    ``glas-seg evaluate`` reports them), pixel Dice is the mean per image.
    """
    if not result.before or not result.after:
        return ""
    numbers = ", ".join(f"{label} {result.before[key]:.3f} -> {result.after[key]:.3f}"
                        for key, label in REPORTED_METRICS if key in result.before and key in result.after)
    kept = f"kept iteration {result.best_iteration}" if result.best_iteration is not None else ""
    if result.best_iteration == 0:
        kept = "no checkpoint beat the base model there, so the new model keeps the base weights"
    if result.stopped_early:
        kept += ", stopped early"
    return (f"On {len(result.val_names)} held-back image(s), base -> fine-tuned: {numbers}"
            + (f" ({kept})" if kept else ""))


def format_thresholds(result: FinetuneResult) -> str:
    """One line on the watershed thresholds calibration chose ("" when it did not run)."""
    t = result.thresholds
    if not t:
        return ""
    pair = f"seed {t['interior_threshold']:g}, foreground {t['foreground_threshold']:g}"
    if "min_size" in t:
        pair += f", smallest object {t['min_size']} px"
    return (f"Thresholds chosen on the corrected images: {pair}" if t["chosen"]
            else f"Thresholds kept ({pair}): none scored better on the corrected images or the held-back ones")

