"""Where a training run starts: a run folder to resume, or the weights of a trained model.

A run folder (:func:`.training.train`) that holds ``state.json`` and ``last.safetensors`` is
resumed by the same command; :func:`check_resume` refuses, before any data is read, settings that
the saved optimizer would silently override. ``glas-seg train --init MODEL`` starts a new run
from a bundled, user or file model instead of ImageNet's weights (:func:`initial_weights`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .checkpoint import ModelConfig, file_sha256, load_state
from .errors import GlasSegError
from .registry import find_model

__all__ = ["FIXED_ON_RESUME", "INIT_FIELDS", "check_resume", "initial_weights", "resumable"]


#: Configuration fields a starting model must share with the new run: they decide the weights'
#: names and shapes (architecture, builder arguments, output channels). Scale, task and targets
#: may change (that is what a new run is for); the input normalisation is the starting model's.
INIT_FIELDS = ("architecture", "arch_kwargs", "class_names")


def initial_weights(source: str | Path, config: ModelConfig) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """Weights of a trained model to start a new training run from (``glas-seg train --init``).

    Parameters
    ----------
    source : str or path
        A bundled or user model name, or a ``.safetensors`` model file.
    config : ModelConfig
        The new run's configuration.

    Returns
    -------
    state : dict of str to float32 Tensor
        The model's weights, for :func:`train`'s ``init_state``.
    config : ModelConfig
        ``config`` with the starting model's input normalisation (``mean``, ``std``): its
        weights expect their inputs scaled that way.
    record : dict
        ``{"model": name, "sha256": file hash}``, for the new model's training record.

    Raises
    ------
    GlasSegError
        Unknown model, damaged file, or a model whose :data:`INIT_FIELDS` differ from ``config``.
    """
    entry = find_model(source)
    state, start = load_state(entry.path)
    differ = [name for name in INIT_FIELDS if _comparable(getattr(start, name)) != _comparable(getattr(config, name))]
    if differ:
        detail = "; ".join(f"{name} {getattr(start, name)!r} there, {getattr(config, name)!r} here" for name in differ)
        raise GlasSegError(f"{entry.name} cannot start this run: {detail}. Train with its --model and "
                           "--arch-kwargs, or leave --init out")
    config = dataclasses.replace(config, mean=tuple(start.mean), std=tuple(start.std))
    return state, config, {"model": entry.name, "sha256": file_sha256(entry.path)}


def _comparable(value):
    return [_comparable(v) for v in value] if isinstance(value, (tuple, list)) else value


#: Settings kept in a run's saved optimizer state: a resumed run goes on with the saved values
#: whatever it is given, so a change is refused rather than recorded but not applied.
FIXED_ON_RESUME = ("learning_rate", "encoder_lr_factor", "optimizer", "weight_decay")


def resumable(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a run that :func:`train` resumes."""
    out_dir = Path(out_dir)
    return (out_dir / "state.json").is_file() and (out_dir / "last.safetensors").is_file()


def check_resume(out_dir: str | Path, settings) -> None:
    """GlasSegError when ``out_dir`` holds a run to resume whose :data:`FIXED_ON_RESUME` settings
    ``settings`` (a :class:`.training.TrainSettings`) would change. Other settings (iterations,
    validation, crops, augmentation) may change on resume. A folder without a run, or with an
    unreadable one, passes (:func:`.training.train` reports the latter)."""
    if not resumable(out_dir):
        return
    try:
        saved = json.loads((Path(out_dir) / "state.json").read_text())["settings"]
        defaults = dataclasses.asdict(type(settings)())
        changed = [f"{name} {saved.get(name, defaults[name])!r} -> {getattr(settings, name)!r}"
                   for name in FIXED_ON_RESUME if saved.get(name, defaults[name]) != getattr(settings, name)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    if changed:
        raise GlasSegError(f"{out_dir} holds a run that this command would resume, but its optimizer keeps its own "
                           f"settings: {'; '.join(changed)}. Give the run's values, or start a new run with another --out")
