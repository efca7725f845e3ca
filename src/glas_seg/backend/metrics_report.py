"""Score sets of images (files, stack planes): per-image rows, the pooled row, exports.

Used by the ``glas-seg evaluate`` command, the Metrics dock widget and training validation.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .image_io import natural_key
from .labelmaps import label_files as _label_files  # one pairing rule, shared with data.find_pairs
from .metrics import ObjectMatches, match_stack, object_scores
from .metrics_pixel import PIXEL_KEYS, auc, pixel_counts, pixel_scores, roc_curve
from .outputs import write_file

OBJECT_KEYS = ("object_f1", "object_dice", "object_hausdorff", "object_precision", "object_recall",
               "tp", "fp", "fn", "n_pred", "n_gt", "count_error")
COLUMNS = OBJECT_KEYS + PIXEL_KEYS + ("roc_auc",)


@dataclass
class ImageResult:
    """Scores of one image (or one stack plane, or one stack with its planes pooled).

    ``matches`` holds one :class:`ObjectMatches` per 2D plane; ``pixels`` the foreground
    confusion counts; ``roc`` ``(fpr, tpr, thresholds)`` or None; ``row`` every metric of
    :data:`COLUMNS` (``roc_auc`` is NaN without a probability map or when undefined).
    """

    name: str
    matches: list[ObjectMatches]
    pixels: dict[str, int]
    roc: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    row: dict[str, float]


@dataclass
class Report:
    """Per-image rows plus the pooled row (challenge style) and the mean of the image rows."""

    images: dict[str, ImageResult] = field(default_factory=dict)
    pooled: dict[str, float] = field(default_factory=dict)
    mean_per_image: dict[str, float] = field(default_factory=dict)
    roc: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def to_dict(self) -> dict:
        """``{"pooled": {...}, "mean_per_image": {...}, "images": {name: {...}}}``."""
        return {"pooled": dict(self.pooled), "mean_per_image": dict(self.mean_per_image),
                "images": {name: dict(result.row) for name, result in self.images.items()}}


def _roc_or_none(probability, truth) -> tuple | None:
    try:
        return roc_curve(probability, truth)
    except ValueError as exc:
        if "both foreground and background" in str(exc):
            return None  # one class only: AUC undefined for this image, reported as NaN
        raise


def score_image(name: str, seg: np.ndarray, gt: np.ndarray, probability: np.ndarray | None = None) -> ImageResult:
    """All metrics of one label-map pair; the planes of stacks are pooled.

    Parameters
    ----------
    name : str
        Row name.
    seg, gt : ndarray of int, shape ``(H, W)`` or ``(..., H, W)``
        Prediction and ground truth label maps.
    probability : ndarray of float, same shape, optional
        Foreground probability, for the ROC curve and its AUC.
    """
    matches = match_stack(seg, gt)
    pixels = pixel_counts(seg, gt)
    roc = None
    if probability is not None:
        if np.shape(probability) != np.shape(gt):
            raise ValueError(f"Probability map {np.shape(probability)} and labels {np.shape(gt)} differ in shape")
        roc = _roc_or_none(probability, gt)
    row = {**object_scores(matches), **pixel_scores(pixels), "roc_auc": auc(*roc[:2]) if roc else math.nan}
    return ImageResult(name, matches, pixels, roc, row)


def _mean_rows(rows: list[dict]) -> dict[str, float]:
    out = {}
    for key in COLUMNS:
        values = np.array([row[key] for row in rows], dtype=np.float64)
        finite_or_inf = values[~np.isnan(values)]
        out[key] = float(finite_or_inf.mean()) if finite_or_inf.size else math.nan
    return out


def score_set(items: Iterable[tuple], progress: Callable[[int, int], None] | None = None,
              total: int | None = None) -> Report:
    """Score image pairs one by one and pool them as a GlaS test part.

    Parameters
    ----------
    items : iterable of ``(name, seg, gt)`` or ``(name, seg, gt, probability)``
        May be a generator that reads files lazily (pass ``total`` then); to cancel, let it
        raise.
    progress : callable ``(done, total)``, optional
        Called after each image.
    total : int, optional
        Number of items, for ``progress``; by default ``len(items)``, or 0 when unknown.

    Returns
    -------
    Report
        ``pooled`` sums TP/FP/FN and pixel counts and weights objects by the whole set's
        areas; ``mean_per_image`` averages the image rows (NaN entries skipped).
    """
    if total is None:
        total = len(items) if hasattr(items, "__len__") else 0
    report = Report()
    sums = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    scores, truths, have_all_probs = [], [], True
    for done, item in enumerate(items):
        name, seg, gt, probability = (*item, None)[:4]
        if name in report.images:
            raise ValueError(f"Two images are called {name!r}")
        result = score_image(name, seg, gt, probability)
        report.images[name] = result
        sums = {k: sums[k] + result.pixels[k] for k in sums}
        if probability is None:
            have_all_probs = False
        elif have_all_probs:
            scores.append(np.asarray(probability, dtype=np.float32).ravel())
            truths.append(np.asarray(gt).ravel() != 0)
        if progress is not None:
            progress(done + 1, total)
    all_matches = [m for result in report.images.values() for m in result.matches]
    report.roc = _roc_or_none(np.concatenate(scores), np.concatenate(truths)) if have_all_probs and scores else None
    report.pooled = {**object_scores(all_matches), **pixel_scores(sums),
                     "roc_auc": auc(*report.roc[:2]) if report.roc else math.nan}
    report.mean_per_image = _mean_rows([r.row for r in report.images.values()]) if report.images else {}
    return report


# -- files --------------------------------------------------------------------------------
def pair_label_files(pred_dir: str | Path, gt_dir: str | Path) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """Pair prediction and ground-truth label files by name.

    A file ``X_labels.tif`` (or ``_label``, ``_anno``, ``_mask``, ``_gt``, any image suffix)
    is named ``X``, as is a plain ``X.tif`` / ``X.png``; where both exist the suffixed file
    is the label map (a GlaS folder holds the image ``X.bmp`` next to ``X_anno.bmp``).

    Returns
    -------
    pairs : list of (name, pred_path, gt_path), sorted naturally by name
    pred_only, gt_only : lists of str
        Names found on one side only.
    """
    preds, gts = _label_files(Path(pred_dir)), _label_files(Path(gt_dir))
    names = sorted(preds.keys() & gts.keys(), key=natural_key)
    return ([(n, preds[n], gts[n]) for n in names], sorted(preds.keys() - gts.keys(), key=natural_key),
            sorted(gts.keys() - preds.keys(), key=natural_key))


def _json_value(value):
    """JSON has no NaN or infinity: both become null (see docs/metrics.md)."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(report: Report, path: str | Path) -> None:
    """``{"pooled", "mean_per_image", "images"}``, written atomically (GlasSegError if it cannot be)."""
    data = report.to_dict()
    clean = {k: ({n: {m: _json_value(v) for m, v in row.items()} for n, row in data[k].items()} if k == "images"
                 else {m: _json_value(v) for m, v in data[k].items()}) for k in data}
    text = json.dumps(clean, indent=1, allow_nan=False) + "\n"
    write_file(path, lambda tmp: Path(tmp).write_text(text), "JSON report")


def write_csv(report: Report, path: str | Path) -> None:
    """One row per image, then ``pooled`` and ``mean_per_image``; ``inf`` / ``nan`` as text."""
    rows = [(name, r.row) for name, r in report.images.items()]
    rows += [("pooled", report.pooled), ("mean_per_image", report.mean_per_image)]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("image",) + COLUMNS)
            for name, row in rows:
                writer.writerow([name] + [row.get(k, math.nan) for k in COLUMNS])

    write_file(path, write, "CSV report")  # atomically: a failed run never leaves half a table


def format_table(report: Report) -> str:
    """Plain-text table in the challenge layout: F1, object Dice, object Hausdorff (+ context)."""
    head = f"{'image':<24}{'F1':>8}{'ObjDice':>9}{'ObjHausd':>10}{'PixDice':>9}{'pred':>6}{'gt':>6}"
    lines = [head, "-" * len(head)]

    def line(name, row):
        return (f"{name[:23]:<24}{row['object_f1']:>8.3f}{row['object_dice']:>9.3f}{row['object_hausdorff']:>10.2f}"
                f"{row['pixel_dice']:>9.3f}{row['n_pred']:>6.0f}{row['n_gt']:>6.0f}")

    lines += [line(name, r.row) for name, r in report.images.items()]
    lines.append("-" * len(head))
    lines.append(line("pooled (GlaS)", report.pooled))
    if report.mean_per_image:
        lines.append(line("mean per image", report.mean_per_image))
    return "\n".join(lines)
