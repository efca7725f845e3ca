"""Models by name: the ones bundled in the package and the ones the user trained.

A model name resolves to one safetensors file (see :mod:`.checkpoint`). Bundled models live
in ``glas_seg/weights``; user models in the user data directory (platformdirs), or
``$GLAS_SEG_MODEL_DIR`` when set (used by tests and shared workstations).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from platformdirs import user_data_dir

from .checkpoint import ModelConfig, load_state, read_config
from .models import INFERENCE_MODES, build_architecture

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_MODEL = "unet-glands"


def user_model_dir() -> Path:
    """Directory of the user's own models (created on demand by writers, not here)."""
    override = os.environ.get("GLAS_SEG_MODEL_DIR")
    return Path(override) if override else Path(user_data_dir("glas-seg", appauthor=False)) / "models"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    source: str  # "bundled" or "user"
    config: ModelConfig


def list_models() -> list[ModelEntry]:
    """Bundled models first, then user models, each sorted by name.

    Files that cannot be read are left out rather than breaking the list.
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
    """Resolve a model name (bundled or user) or a path to a model file."""
    path = Path(name_or_path)
    if path.suffix == ".safetensors" and path.is_file():
        return ModelEntry(path.stem, path, "file", read_config(path))
    for entry in list_models():
        if entry.name == str(name_or_path):
            return entry
    names = ", ".join(e.name for e in list_models()) or "none"
    raise ValueError(f"No model named {str(name_or_path)!r}. Available: {names}")


@dataclass
class LoadedModel:
    """A network in eval mode on its device, with the configuration it was trained with."""

    network: torch.nn.Module
    config: ModelConfig
    device: torch.device


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no CUDA GPU is available; choose 'cpu' or 'auto'")
    return device


def build_model(config: ModelConfig) -> torch.nn.Module:
    return build_architecture(config.architecture, **config.arch_kwargs)


def load_model(
    name_or_path: str | Path = DEFAULT_MODEL, device: str | torch.device | None = "auto", mode: str | None = None
) -> LoadedModel:
    """Load a ready-to-run model by name or path.

    ``mode`` picks the inference mode of architectures that have several (U-Net++:
    ``"accurate"`` averages its heads, ``"fast"`` uses one pruned head); ``None`` keeps the
    model's own.

    Raises
    ------
    ValueError
        Unknown name, unreadable or damaged file, or weights that do not fit the architecture.
    """
    entry = find_model(name_or_path)
    state, config = load_state(entry.path)
    network = build_model(config)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"Weights in {entry.path.name} do not match architecture {config.architecture}") from exc
    if mode is not None:
        if config.architecture not in INFERENCE_MODES:
            raise ValueError(f"Model {entry.name} ({config.architecture}) has no inference modes")
        network.set_mode(mode)
    target = pick_device(device)
    return LoadedModel(network.to(target).eval(), config, target)
