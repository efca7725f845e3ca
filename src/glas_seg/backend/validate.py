"""Checks of user-supplied options and arrays, shared by the API, the CLI and the widgets.

Each check raises :class:`.errors.GlasSegError` with one line naming the option, the value and
what is allowed, before any work starts: a negative tile size must not run for a minute and
return nonsense, a batch size of 0 must not fail deep inside PyTorch.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np

from .errors import GlasSegError


def integer(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int, or GlasSegError when it is not an integer in ``[low, high]``.

    bool is refused although Python counts it as an int: ``tile_size=True`` is a mistake.
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise GlasSegError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise GlasSegError(f"{name} must be {_bounds(low, high)}, got {value}")
    return value


def number(value: Any, name: str, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float within the bounds (open bounds exclude their end)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise GlasSegError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise GlasSegError(f"{name} must be {_bounds(low, high, low_open, high_open)}, got {value:g}")
    return value


def choice(value: Any, name: str, options) -> Any:
    if value not in tuple(options):
        raise GlasSegError(f"{name} must be one of {', '.join(map(str, options))}, got {value!r}")
    return value


def _bounds(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"between {low} and {high}" + (" (exclusive)" if low_open or high_open else "")
    if low is not None:
        return f"{'greater than' if low_open else 'at least'} {low}"
    return f"{'less than' if high_open else 'at most'} {high}"


def check_segment_options(tile_size: Any = None, overlap: Any = 0.25, batch_size: Any = 4,
                          min_size: Any = None) -> None:
    """Check the options of :func:`.inference.segment` (``None`` means the model's default).

    Raises
    ------
    GlasSegError
        ``tile_size`` not a positive integer (it is rounded to the network's stride, so
        anything from 1 works), ``overlap`` outside ``[0, 0.9]``, ``batch_size`` below 1,
        ``min_size`` negative.
    """
    if tile_size is not None:
        integer(tile_size, "tile size", 1, 8192)
    number(overlap, "overlap", 0, 0.9)
    integer(batch_size, "batch size", 1)
    if min_size is not None:
        integer(min_size, "minimum object size", 0)


def check_train_settings(settings) -> None:
    """Check a :class:`.training.TrainSettings`: every value that could not train is refused.

    ``iterations`` 0 would write an empty run folder and report an F1 of -1; a zero learning
    rate or batch size fails later and less clearly.
    """
    integer(settings.iterations, "iterations", 1)
    integer(settings.eval_every, "eval_every", 1)
    integer(settings.batch_size, "batch size", 1)
    integer(settings.crop_size, "crop size", 16, 4096)
    number(settings.learning_rate, "learning rate", 0, 1, low_open=True, high_open=True)
    number(settings.weight_decay, "weight decay", 0)
    integer(settings.warmup, "warmup", 0)
    for name in ("boundary_weight", "dice_weight", "aux_weight"):
        number(getattr(settings, name), name.replace("_", " "), 0)
    number(settings.gap_weight, "gap weight", 0)
    integer(settings.gap_radius, "gap radius", 1, 64)
    choice(settings.optimizer, "optimizer", ("adamw", "amsgrad", "sgd"))
    integer(settings.seed, "seed", 0)
    number(settings.encoder_lr_factor, "encoder learning-rate factor", 0, 10, low_open=True)
    if settings.loader_workers is not None:
        integer(settings.loader_workers, "loader workers", 0, 256)
    if hasattr(settings, "glass"):
        number(settings.glass, "glass share", 0, 1)
    if hasattr(settings, "glass_fill"):
        number(settings.glass_fill, "glass fill share", 0, 1)
    if hasattr(settings, "layers"):  # fine-tuning options (backend/trainable.py)
        from .settings import LAYER_CHOICES

        choice(settings.layers, "layers", LAYER_CHOICES)
        number(settings.l2sp, "L2-SP strength", 0)
        number(settings.augment_strength, "augmentation strength", 0, 2)
        integer(settings.patience, "patience", 0)


def check_label_ids(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Refuse label maps that are not integers or hold negative ids (0 is background, ids > 0 objects).

    Returns ``labels`` unchanged.
    """
    labels = np.asarray(labels)
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise GlasSegError(f"{name}: label maps must hold integer ids, got {labels.dtype}")
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise GlasSegError(f"{name}: label ids must be 0 (background) or positive, found {int(labels.min())}")
    return labels


__all__ = ["integer", "number", "choice", "check_segment_options", "check_train_settings", "check_label_ids"]
