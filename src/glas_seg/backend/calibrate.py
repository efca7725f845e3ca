"""Choosing a model's post-processing thresholds on annotated images.

A pixel classifier's watershed (:func:`.postprocess.labels_from_probabilities`) has two
thresholds: the interior probability that seeds an object and the foreground probability that
bounds it; a third, the smallest object kept (``min_size``), drops the small false glands a
network leaves between real ones (on the GlaS validation images most false positives of the
default model were under 2000 pixels, most real glands far larger: docs/models.md). Their best
values move with the cohort: on malignant GlaS glands, which the bundled models under-segment,
a lower seed threshold and a higher foreground threshold split fewer glands and fuse fewer
neighbours (docs/finetuning.md). Choosing them on a user's corrected
images costs one network pass per image (probabilities are computed once and post-processed
for every pair of thresholds on a small grid), needs no training, and cannot make the network
forget anything.

The score is the GlaS object F1 plus object Dice, pooled over all objects of the images
(:func:`.metrics.object_scores`): F1 alone rewards splitting a gland into a matching piece and
dropping the rest, Dice alone ignores how many glands were found.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import GlasSegError
from .progress import CancelToken, ProgressCallback, raise_if_cancelled

__all__ = ["FINETUNE_MIN_SIZE_FACTORS", "MIN_SIZE_FACTORS", "THRESHOLD_GRID", "Calibration", "calibrate_thresholds",
           "min_size_grid"]

#: Values tried for each threshold (25 pairs).
THRESHOLD_GRID = (0.3, 0.4, 0.5, 0.6, 0.7)

#: Smallest-object sizes tried after training, as multiples of the model's own (400 -> 400 ... 3000 pixels).
MIN_SIZE_FACTORS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.5)
#: Sizes tried when fine-tuning, around a base model's own (which may have been chosen already).
FINETUNE_MIN_SIZE_FACTORS = (0.25, 0.5, 1.0, 1.5, 2.0)


def min_size_grid(min_size: int, factors: Sequence[float] = MIN_SIZE_FACTORS) -> tuple[int, ...]:
    """Smallest-object sizes to try for a model whose own is ``min_size`` pixels (at least 1)."""
    base = max(int(min_size), 1)
    return tuple(sorted({max(1, round(base * f)) for f in factors}))


@dataclass
class Calibration:
    """Result of :func:`calibrate_thresholds`.

    interior_threshold, foreground_threshold : float
        The chosen pair (the model's own when nothing scored higher).
    min_size : int
        The chosen smallest object, full-resolution pixels (the model's own unless sizes were tried).
    before, after : dict
        Pooled ``object_f1``, ``object_dice`` and ``score`` (their sum) at the model's thresholds
        and at the chosen ones, on the calibration images.
    table : list of dict
        Every pair tried, with its scores.
    """

    interior_threshold: float
    foreground_threshold: float
    min_size: int
    before: dict
    after: dict
    table: list = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.after["score"] > self.before["score"]


def _pooled(matches: list) -> dict:
    from .metrics import object_scores

    scores = object_scores(matches)
    f1, dice = float(scores["object_f1"]), float(scores["object_dice"])
    return {"object_f1": round(f1, 4), "object_dice": round(dice, 4), "score": round(f1 + dice, 4)}


def calibrate_thresholds(
    model,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    masks: Sequence[np.ndarray] | None = None,
    grid: Sequence[float] = THRESHOLD_GRID,
    min_sizes: Sequence[int] = (),
    mask_glass: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelToken = None,
) -> Calibration:
    """The interior and foreground thresholds (and smallest object) that segment annotated images best.

    Parameters
    ----------
    model : LoadedModel
        A pixel classifier (three-class output); detection models have no thresholds here.
    images : sequence of ndarray, each ``(H, W, 3)``
        Images as :func:`.inference.segment` takes them.
    labels : sequence of int ndarray, each ``(H, W)``
        Their corrected instance labels.
    masks : sequence of bool ndarray ``(H, W)``, optional
        Where each image was corrected: outside, prediction and labels are both cleared before
        scoring, so uncorrected areas neither reward nor punish a choice.
    grid : sequence of float
        Values tried for each threshold; the model's own pair is always tried too. Empty: the
        model's own pair only.
    min_sizes : sequence of int
        Smallest-object sizes (full-resolution pixels) tried with every pair, e.g.
        :func:`min_size_grid`; the model's own is always tried too. Empty: the model's own only.
    mask_glass : bool
        As for :func:`.inference.segment`.
    progress : callable ``progress(done, total)``, optional
        Called after each image's network pass.
    cancel : threading.Event or callable, optional

    Returns
    -------
    Calibration
        Ties keep the model's own thresholds.

    Raises
    ------
    GlasSegError
        A detection model, no images, or images and labels that do not pair up.
    """
    from .inference import hide_glass, predict_probabilities, predicts_instances
    from .metrics import match_stack
    from .postprocess import labels_from_probabilities

    if predicts_instances(model):
        raise GlasSegError(f"{model.config.name} detects objects directly: it has no watershed thresholds to choose")
    images, labels = list(images), list(labels)
    if not images or len(images) != len(labels):
        raise GlasSegError(f"give one label map per image to calibrate on ({len(images)} images, {len(labels)} label maps)")
    masks = [None] * len(images) if masks is None else [np.asarray(m, bool) for m in masks]
    config = model.config
    own = (float(config.interior_threshold), float(config.foreground_threshold), int(config.min_size))
    sizes = set(min_sizes) | {own[2]}
    pairs = set(itertools.product(grid, grid)) | {own[:2]}
    settings = sorted((i, f, m) for (i, f), m in itertools.product(pairs, sizes))
    matches = {setting: [] for setting in settings}
    for index, (image, truth, mask) in enumerate(zip(images, labels, masks)):
        raise_if_cancelled(cancel)
        shape = np.asarray(image).shape[:2]
        if np.asarray(truth).shape != shape or (mask is not None and mask.shape != shape):
            raise GlasSegError(f"image {index + 1} is {shape[0]}x{shape[1]} but its labels or region mask are not")
        rgb, glass = hide_glass(image) if mask_glass else (image, None)
        probabilities = predict_probabilities(model, rgb, cancel=cancel)
        del rgb
        truth = np.where(mask, truth, 0) if mask is not None else np.asarray(truth)
        for interior, foreground, min_size in settings:
            predicted = labels_from_probabilities(probabilities, shape, min_size=min_size, scale=config.scale,
                                                  glass=glass, interior_threshold=interior,
                                                  foreground_threshold=foreground)
            if mask is not None:
                predicted[~mask] = 0
            matches[(interior, foreground, min_size)].extend(match_stack(predicted, truth))
        if progress is not None:
            progress(index + 1, len(images))
    table = [{"interior_threshold": i, "foreground_threshold": f, "min_size": m, **_pooled(matches[(i, f, m)])}
             for i, f, m in settings]
    before = next(row for row in table
                  if (row["interior_threshold"], row["foreground_threshold"], row["min_size"]) == own)
    best = max(table, key=lambda row: (row["score"], row is before))
    return Calibration(best["interior_threshold"], best["foreground_threshold"], best["min_size"],
                       {k: before[k] for k in ("object_f1", "object_dice", "score")},
                       {k: best[k] for k in ("object_f1", "object_dice", "score")}, table)
