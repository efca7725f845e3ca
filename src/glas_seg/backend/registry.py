"""Models by name: the ones bundled in the package and the ones the user trained.

A model name resolves to one safetensors file (see :mod:`.checkpoint`). Bundled models live
in ``glas_seg/weights``; user models in the user data directory (platformdirs), or
``$GLAS_SEG_MODEL_DIR`` when set (used by tests and shared workstations).

Listing and finding models reads only the files' JSON headers and never imports torch, so
``glas-seg models``, ``glas-seg --help`` and the napari model list start fast; torch is imported
by the functions that build or load a network (:func:`build_network`, :func:`load_model`,
:func:`pick_device`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from platformdirs import user_data_dir

from .checkpoint import ModelConfig, read_config
from .errors import GlasSegError

if TYPE_CHECKING:  # annotations only: importing this module must not import torch
    import torch

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_MODEL = "efficientnet-unet-glands"

#: How the one validation number of a model is labelled wherever it is shown (CLI, widget, docs).
VALIDATION_LABEL = "val. object F1 (pooled)"


def user_model_dir() -> Path:
    """Directory of the user's own models (created on demand by writers, not here)."""
    override = os.environ.get("GLAS_SEG_MODEL_DIR")
    return Path(override) if override else Path(user_data_dir("glas-seg", appauthor=False)) / "models"


@dataclass(frozen=True)
class ModelEntry:
    """One model file: ``name``, ``path``, ``source`` (``"bundled"``, ``"user"`` or ``"file"``)
    and the :class:`.checkpoint.ModelConfig` read from its header."""

    name: str
    path: Path
    source: str
    config: ModelConfig

    @property
    def validation_score(self) -> float | None:
        """Validation object F1 pooled over the model's validation images (:func:`validation_score`)."""
        return validation_score(self.config)


def list_models() -> list[ModelEntry]:
    """Bundled models first, then user models, each sorted by name.

    Reads only the files' headers. Files that cannot be read are left out rather than
    breaking the list.
    """
    entries = []
    for source, folder in (("bundled", BUNDLED_DIR), ("user", user_model_dir())):
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                config = read_config(path)
            except ValueError:
                continue
            entries.append(ModelEntry(path.stem, path, source, config))
    return entries


def find_model(name_or_path: str | Path) -> ModelEntry:
    """Resolve a model name (bundled or user) or a path to a model file.

    Raises
    ------
    GlasSegError
        No model of that name and no such file.
    """
    path = Path(name_or_path)
    if path.suffix == ".safetensors" and path.is_file():
        return ModelEntry(path.stem, path, "file", read_config(path))
    entries = list_models()
    for entry in entries:
        if entry.name == str(name_or_path):
            return entry
    damaged = user_model_dir() / f"{name_or_path}.safetensors"
    if path.name == str(name_or_path) and damaged.is_file():  # listed models skip unreadable files
        try:
            read_config(damaged)
        except GlasSegError as exc:
            raise GlasSegError(f"User model {str(name_or_path)!r} is damaged ({exc}); "
                               "delete it (glas-seg models delete) or import it again") from None
    names = ", ".join(e.name for e in entries) or "none"
    raise GlasSegError(f"No model named {str(name_or_path)!r}. Available: {names}")


def validation_score(config: ModelConfig) -> float | None:
    """The one number that summarises a model: its validation object F1, pooled over the
    validation images as the GlaS challenge pools them (what ``glas-seg evaluate`` reports as
    "pooled" and docs/models.md lists), as recorded in the model file; None when the model was
    not validated (a fine-tune without held-out images) or its record predates pooling."""
    value = ((config.training or {}).get("validation") or {}).get("object_f1_pooled")
    return float(value) if isinstance(value, (int, float)) else None


def format_validation_score(config: ModelConfig) -> str:
    """``"val. object F1 (pooled) 0.790"``, or ``""`` for a model without one."""
    value = validation_score(config)
    return "" if value is None else f"{VALIDATION_LABEL} {value:.3f}"


def model_summary(entry: ModelEntry) -> str:
    """One line about a model for lists and tooltips: task, architecture, base, validation."""
    config = entry.config
    parts = [f"{entry.source} {config.task} model, {config.architecture}"]
    if config.base_model:
        parts.append(f"fine-tuned from {config.base_model}")
    score = format_validation_score(config)
    if score:
        parts.append(score)
    return "; ".join(parts)


# -- networks (these import torch) ---------------------------------------------------------------
@dataclass
class LoadedModel:
    """A network in eval mode on its device, with the configuration it was trained with."""

    network: "torch.nn.Module"
    config: ModelConfig
    device: "torch.device"


def available_devices() -> list[str]:
    """Device names that work on this machine: ``auto``, ``cpu``, then ``cuda``, ``cuda:N`` and ``mps`` where present."""
    import torch

    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def pick_device(device: "str | torch.device | None" = "auto") -> "torch.device":
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU.

    Raises
    ------
    GlasSegError
        A device name that is not one of :func:`available_devices` (the message lists them).
    """
    import torch

    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    here = f"devices on this machine: {', '.join(available_devices())}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise GlasSegError(f"Unknown device {str(device)!r}; {here}") from None
    if parsed.type not in ("cpu", "cuda", "mps"):  # meta, xla...: parse, but cannot run a model
        raise GlasSegError(f"Unsupported device {str(device)!r}; {here}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise GlasSegError(f"CUDA ({str(device)!r}) was requested but no CUDA GPU is available; {here}")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise GlasSegError(f"There is no GPU {str(device)!r}; {here}")
    if parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GlasSegError(f"Apple MPS was requested but is not available; {here}")
    return parsed


def build_model(config: ModelConfig) -> "torch.nn.Module":
    """An untrained network of the architecture ``config`` names (random weights)."""
    from .models import build_architecture

    return build_architecture(config.architecture, **config.arch_kwargs)


def build_network(config: ModelConfig, state: dict, source: str = "the model file") -> "torch.nn.Module":
    """Build the architecture ``config`` names and load ``state`` into it (on the CPU).

    The one place that turns stored weights into a network: :func:`load_model`, fine-tuning and
    ``glas-seg train --export`` all go through it.

    Parameters
    ----------
    config : ModelConfig
    state : dict of str to tensor
        Weights as from :func:`.checkpoint.load_state`.
    source : str
        Names the weights' origin in the error message.

    Raises
    ------
    GlasSegError
        The weights do not fit the architecture.
    """
    network = build_model(config)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise GlasSegError(f"Weights in {source} do not match architecture {config.architecture}") from exc
    return network


def load_model(
    name_or_path: str | Path = DEFAULT_MODEL, device: "str | torch.device | None" = "auto", mode: str | None = None
) -> LoadedModel:
    """Load a ready-to-run model by name or path.

    ``mode`` picks the inference mode of architectures that have several (U-Net++:
    ``"accurate"`` averages its heads, ``"fast"`` uses one pruned head); ``None`` keeps the
    model's own.

    Raises
    ------
    GlasSegError
        Unknown name, unreadable or damaged file, or weights that do not fit the architecture.
    """
    from .checkpoint import load_state
    from .models import INFERENCE_MODES

    entry = find_model(name_or_path)
    state, config = load_state(entry.path)
    network = build_network(config, state, entry.path.name)
    if mode is not None:
        if config.architecture not in INFERENCE_MODES:
            raise GlasSegError(f"Model {entry.name} ({config.architecture}) has no inference modes")
        network.set_mode(mode)
    target = pick_device(device)
    if target.type == "cpu":
        from .threads import use_torch_threads

        use_torch_threads()  # physical cores not busy elsewhere (backend/threads.py)
    return LoadedModel(network.to(target).eval(), config, target)
