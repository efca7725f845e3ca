"""Model files: safetensors weights with the model's configuration as JSON in the header.

One file per model, so that a model is written atomically and can never be half-updated,
and loading it never executes code (safetensors holds only tensors and strings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from .errors import GlasSegError

if TYPE_CHECKING:  # torch is imported by the functions that handle weights, so that reading a
    import torch   # model's configuration (listing models, --help) never imports it

METADATA_KEY = "glas_seg"
FORMAT_VERSION = 1


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model and run it the way it was trained.

    Attributes
    ----------
    name : str
        Model name shown to users.
    architecture : str
        Key in :data:`glas_seg.backend.models.ARCHITECTURES`.
    arch_kwargs : dict
        Builder keyword arguments.
    task : {"glands", "nuclei"}
    scale : float
        Factor applied to the input image before the network (0.5 = half resolution).
    mean, std : tuple of 3 floats
        Per-channel normalisation applied to RGB in ``[0, 1]``.
    class_names : tuple of str
        Output channels, for the contour-aware head ``("background", "interior", "boundary")``.
    tile_size : int
        Default tile side in network pixels for sliding-window inference.
    mpp : float or None
        Micrometres per pixel of the images the model takes as input (before ``scale``), i.e.
        of its training images at full resolution: slides are resampled to it. None for models
        written before the field existed: :func:`model_mpp` then assumes the task's data set.
    targets : {"outer", "inner"}
        Where the boundary class of the training targets lies (:func:`..targets.contour_targets`):
        ``"outer"`` (the older models) a thick band straddling every outline, ``"inner"`` only
        inside objects, so that foreground = the objects as annotated.
    interior_threshold, foreground_threshold : float
        Post-processing of pixel classifiers (:func:`..postprocess.instances_from_probabilities`):
        interior probability that seeds an object, and ``1 - p(background)`` above which a pixel
        belongs to one. 0.5 unless chosen on annotated images (:mod:`..calibrate`).
    base_model : str or None
        Model this one was fine-tuned from.
    training : dict
        Free-form record of data, epochs, wall time and validation metrics.
    """

    name: str
    architecture: str
    arch_kwargs: dict = field(default_factory=dict)
    task: str = "glands"
    scale: float = 0.5
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.25, 0.25, 0.25)
    class_names: tuple = ("background", "interior", "boundary")
    tile_size: int = 384
    min_size: int = 400
    mpp: float | None = None
    targets: str = "outer"
    interior_threshold: float = 0.5
    foreground_threshold: float = 0.5
    base_model: str | None = None
    description: str = ""
    training: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **dataclasses.asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        """Parse a configuration as stored in a model file; every field is checked (GlasSegError)."""
        from .model_schema import config_from_header

        return config_from_header(text, "model configuration")


#: Pixel size of the data sets the bundled models were trained on, for models that do not record
#: theirs: GlaS (glands) was scanned at 20x, about 0.62 um/px; MoNuSeg (nuclei) at 40x, 0.25 um/px.
TASK_MPP = {"glands": 0.62, "nuclei": 0.25}


def model_mpp(config: ModelConfig) -> float:
    """Micrometres per pixel a model expects its input at (the one place with the fallback).

    Returns ``config.mpp`` when the model records it, else the pixel size of its task's
    training data (:data:`TASK_MPP`).
    """
    return float(config.mpp) if config.mpp is not None else TASK_MPP.get(config.task, TASK_MPP["glands"])


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``, so readers never see half a file.

    The new file's bytes reach the disk before the rename, and the rename before this returns
    (``fsync`` of the file, then of its folder): after a power cut ``path`` holds the old file
    or the new one, never an empty one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, folder=True)


def _fsync(path, folder: bool = False) -> None:
    """Flush a file (or a folder's entries) to the disk; folders cannot be opened on Windows."""
    try:
        # Windows' fsync needs a file opened for writing; folders can only be opened read-only.
        fd = os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if folder else os.O_RDWR)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:  # some file systems refuse fsync on folders; the file's own flush is what matters
            raise
    finally:
        os.close(fd)


def save_model(path: str | Path, model: torch.nn.Module, config: ModelConfig, half: bool = False) -> Path:
    """Write weights and configuration to one safetensors file, atomically.

    Parameters
    ----------
    half : bool
        Store floating-point weights as float16 (halves the file; loaded back as float32).
    """
    from safetensors.torch import save_file

    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if half and value.is_floating_point():
            value = value.half()
        tensors[key] = value
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: config.to_json()}))
    return path


def read_config(path: str | Path) -> ModelConfig:
    """Read only the configuration of a model file (fast: the header, not the weights)."""
    path = Path(path)
    try:
        # framework="numpy": "pt" would import torch just to read the header.
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise GlasSegError(f"{path.name} is not a readable glas-seg model file ({exc})") from exc
    if METADATA_KEY not in metadata:
        raise GlasSegError(f"{path.name} is a safetensors file but not a glas-seg model (no configuration)")
    from .model_schema import config_from_header  # checks every field (it imports this module)

    return config_from_header(metadata[METADATA_KEY], path.name)


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read weights (as float32) and configuration of a model file."""
    from safetensors.torch import load_file

    from .model_schema import check_weights

    config = read_config(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise GlasSegError(f"{Path(path).name} is damaged ({exc})") from exc
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    # Names, shapes, dtypes and finite values against the architecture: a file edited or damaged
    # after import must fail here with a message, not segment garbage or crash in a convolution.
    check_weights(Path(path).name, config, state)
    return state, config


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (model files are identified by it in run records and manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_replace(config: ModelConfig, **changes: Any) -> ModelConfig:
    return dataclasses.replace(config, **changes)
