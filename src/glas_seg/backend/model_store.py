"""The user's model store: save, list, rename, delete, export and import fine-tuned models.

A user model is one safetensors file in :func:`.registry.user_model_dir` whose header holds
the model's :class:`.checkpoint.ModelConfig` as JSON (architecture, base model, training data,
date, iterations, validation metrics). Every write goes to a temporary file that is renamed
into place, so the store never holds half a model; importing reads only tensors and JSON and
checks them against the architecture before anything is written, so a file can never run code.

Writers call the functions subscribed with :func:`subscribe`, so that open views (the Segment
widget's model list) follow changes made anywhere in the process.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:  # torch is imported where weights are handled: listing models must not import it
    import torch

from .checkpoint import METADATA_KEY, ModelConfig, atomic_write, config_replace, load_state, read_config
from .errors import GlasSegError
from .model_schema import TASKS, expected_weights, stored_weights, weight_faults
from .registry import BUNDLED_DIR, ModelEntry, list_models, user_model_dir

SUFFIX = ".safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class ModelStoreError(GlasSegError):
    """A store operation that cannot be done; the message says why and what to do."""


# -- change notification ---------------------------------------------------------------------
_listeners: list[weakref.ref] = []
_listeners_lock = threading.Lock()


def subscribe(callback: Callable[[str, str], None]) -> Callable[[], None]:
    """Call ``callback(action, name)`` after every change to the store.

    ``action`` is ``"added"``, ``"renamed"`` (``name`` is the new name) or ``"deleted"``.
    Only a weak reference is kept (bound methods included), so subscribing never keeps a
    widget alive. Callbacks run in the thread that made the change: GUI code must hand the
    call over to its own thread (a queued Qt signal). A callback that raises is dropped.

    Returns
    -------
    unsubscribe : callable
    """
    ref = weakref.WeakMethod(callback) if hasattr(callback, "__self__") else weakref.ref(callback)
    with _listeners_lock:
        _listeners.append(ref)

    def unsubscribe() -> None:
        with _listeners_lock:
            if ref in _listeners:
                _listeners.remove(ref)

    return unsubscribe


def _notify(action: str, name: str) -> None:
    with _listeners_lock:
        refs = list(_listeners)
    for ref in refs:
        callback = ref()
        try:
            if callback is None:
                raise ReferenceError
            callback(action, name)
        except Exception:  # a dead widget (deleted Qt object) must not break the store
            with _listeners_lock:
                if ref in _listeners:
                    _listeners.remove(ref)


# -- names -------------------------------------------------------------------------------------
def user_models() -> list[ModelEntry]:
    """The user's models, sorted by name (unreadable files are left out)."""
    return [entry for entry in list_models() if entry.source == "user"]


def model_path(name: str) -> Path:
    """Where the user model ``name`` is (or would be) stored."""
    return user_model_dir() / f"{check_name(name)}{SUFFIX}"


def check_name(name: str) -> str:
    """Return ``name`` if it can name a model file on every platform, else raise.

    Raises
    ------
    ModelStoreError
    """
    name = str(name).strip()
    if not _NAME.match(name) or name.endswith("."):
        raise ModelStoreError(
            f"{name!r} is not a valid model name: use 1-64 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_new_name(name: str, overwrite: bool = False) -> str:
    """Check that ``name`` is valid and free for a new user model.

    A bundled model's name is never allowed (the user model would be unreachable by name);
    an existing user model's name only with ``overwrite``.
    """
    name = check_name(name)
    if (BUNDLED_DIR / f"{name}{SUFFIX}").exists():
        raise ModelStoreError(f"{name!r} is the name of a bundled model; choose another name")
    if model_path(name).exists() and not overwrite:
        raise ModelStoreError(f"A user model named {name!r} already exists; choose another name or delete it first")
    return name


def damage(path: Path) -> str | None:
    """Why the model file ``path`` cannot be used, from its header alone; None when it looks fine."""
    try:
        read_config(path)
    except GlasSegError as exc:
        return str(exc)
    return None


def damaged_models() -> list[dict]:
    """User model files that cannot be read, as :func:`describe` rows with ``damaged`` set to the reason.

    They are listed rather than hidden so that the user learns about them and can remove them
    with :func:`delete_model`; the other models are unaffected.
    """
    folder = user_model_dir()
    rows = []
    for path in sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []:
        reason = damage(path)
        if reason is not None:
            rows.append({"name": path.stem, "architecture": None, "source": "user", "task": None,
                         "base_model": None, "description": "", "created": None, "iterations": None,
                         "validation": None, "path": str(path), "damaged": reason})
    return rows


def _user_entry(name: str) -> ModelEntry:
    for entry in user_models():
        if entry.name == name:
            return entry
    path = user_model_dir() / f"{name}{SUFFIX}"
    reason = damage(path) if _NAME.match(name) and path.is_file() else None
    if reason is not None:
        raise ModelStoreError(f"User model {name!r} is damaged and can only be deleted: {reason}")
    if (BUNDLED_DIR / f"{name}{SUFFIX}").exists():
        raise ModelStoreError(f"{name!r} is a bundled model; only user models can be changed")
    names = ", ".join(e.name for e in user_models()) or "none"
    raise ModelStoreError(f"No user model named {name!r}. User models: {names}")


# -- writing -----------------------------------------------------------------------------------
def _explain_write_error(exc: OSError, target: Path) -> ModelStoreError:
    folder = target.parent
    if exc.errno == errno.ENOSPC or exc.errno == getattr(errno, "EDQUOT", None):
        reason = f"the disk holding {folder} is full; free some space and try again"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) or isinstance(exc, PermissionError):
        reason = (f"{folder} is read-only or not writable by you; make it writable or set "
                  "GLAS_SEG_MODEL_DIR to a writable folder")
    else:
        reason = f"{exc.strerror or exc}"
    return ModelStoreError(f"Could not write model {target.name}: {reason}. Nothing was changed.")


def _os_error_from(exc: SafetensorError) -> OSError:
    """The OSError inside a safetensors error message (``IoError(Os { code: 28, ... })``)."""
    match = re.search(r"code: (\d+)", str(exc))
    code = int(match.group(1)) if match else errno.EIO
    return OSError(code, os.strerror(code))


def save_file(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    """:func:`safetensors.torch.save_file`, imported when first used (it imports torch)."""
    from safetensors.torch import save_file as _save_file

    _save_file(tensors, path, metadata=metadata)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], config: ModelConfig) -> None:
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: config.to_json()}))
    except OSError as exc:
        raise _explain_write_error(exc, path) from exc
    except SafetensorError as exc:  # safetensors reports I/O failures as its own error type
        raise _explain_write_error(_os_error_from(exc), path) from exc


def save_user_model(network: torch.nn.Module, config: ModelConfig, overwrite: bool = False) -> ModelEntry:
    """Store a trained network as the user model ``config.name`` (float32 weights, atomically).

    Raises
    ------
    ModelStoreError
        Invalid or taken name, full disk, read-only store.
    """
    name = check_new_name(config.name, overwrite)
    tensors = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    path = model_path(name)
    _write_tensors(path, tensors, config)
    _notify("added", name)
    return ModelEntry(name, path, "user", config)


def rename_model(old: str, new: str) -> ModelEntry:
    """Rename a user model (its file and the name stored inside it)."""
    entry = _user_entry(old)
    new = check_new_name(new)
    state, config = load_state(entry.path)
    config = config_replace(config, name=new)
    _write_tensors(model_path(new), _as_stored(entry.path, state), config)
    entry.path.unlink()
    _notify("renamed", new)
    return ModelEntry(new, model_path(new), "user", config)


def delete_model(name: str) -> Path:
    """Delete a user model, damaged ones included; bundled models cannot be deleted.

    Returns the removed path.
    """
    path = model_path(name)  # a valid name: never a path outside the store
    if not path.is_file():
        _user_entry(name)  # raises the reason: a bundled model or no such model
    try:
        path.unlink()
    except OSError as exc:
        raise ModelStoreError(f"Could not delete {path}: {exc.strerror or exc}") from exc
    _notify("deleted", path.stem)
    return path


def export_model(name: str, destination: str | Path, overwrite: bool = False) -> Path:
    """Copy a model (bundled or user) to a ``.safetensors`` file, or into a folder as ``NAME.safetensors``.

    A destination without a suffix is taken as a folder (created if missing).
    """
    from .registry import find_model

    entry = find_model(name)
    destination = Path(destination)
    if destination.is_dir() or not destination.suffix:
        destination = destination / f"{entry.name}{SUFFIX}"
    if destination.suffix != SUFFIX:
        raise ModelStoreError(f"Export to a {SUFFIX} file, not {destination.name!r}")
    if destination.exists() and not overwrite:
        raise ModelStoreError(f"{destination} already exists; choose another file or allow overwriting")
    try:
        atomic_write(destination, lambda tmp: shutil.copyfile(entry.path, tmp))
    except OSError as exc:
        raise _explain_write_error(exc, destination) from exc
    return destination


# -- importing -----------------------------------------------------------------------------------
def _as_stored(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights in the precision the file stored them in (float16 files stay float16)."""
    half = is_float16_file(path)
    return {k: v.half() if half and v.is_floating_point() else v for k, v in state.items()}


def validate_model_file(path: str | Path) -> ModelConfig:
    """Check that a file is a complete, usable glas-seg model without running any code.

    The header is read first (no weights) and every configuration field checked
    (:mod:`.model_schema`: types, lengths, ranges, consistency with the architecture); the
    architecture is built on PyTorch's ``meta`` device (no memory) and every tensor name, shape
    and dtype is compared with it, so a file that claims a huge network is refused before
    anything is allocated. Then the weights are loaded and must be finite.

    Returns
    -------
    ModelConfig

    Raises
    ------
    ModelStoreError
        With every reason on one line: not a safetensors file, not a glas-seg model, invalid
        configuration, missing, extra, misshaped or integer weights, non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelStoreError(f"No such file: {path}")
    try:
        config = read_config(path)  # every configuration field (see .model_schema)
        # Names, shapes and dtypes from the header before any weight is read, against the network
        # built on the meta device: a file claiming a huge network allocates nothing.
        try:
            with safe_open(str(path), framework="numpy") as f:
                stored = stored_weights(f)
        except (SafetensorError, OSError) as exc:
            raise GlasSegError(f"{path.name} is damaged ({exc})") from exc
        faults = weight_faults(expected_weights(config), stored)
        if faults:
            raise GlasSegError(f"{path.name}: its weights do not fit architecture {config.architecture!r} "
                               f"({'; '.join(faults)})")
        load_state(path)  # the same checks on the tensors themselves, and finite values
    except ModelStoreError:
        raise
    except GlasSegError as exc:
        raise ModelStoreError(f"Refused: {exc}") from exc
    return config


def import_model(path: str | Path, name: str | None = None, overwrite: bool = False) -> ModelEntry:
    """Validate a model file (see :func:`validate_model_file`) and add it to the user store.

    Parameters
    ----------
    path : path
        A ``.safetensors`` file exported by glas-seg.
    name : str, optional
        Name in the store (default: the file's stem). The stored configuration is updated.
    overwrite : bool
        Replace an existing user model of that name.
    """
    path = Path(path)
    config = validate_model_file(path)
    name = check_new_name(name or path.stem, overwrite)
    state, _ = load_state(path)
    target = model_path(name)
    _write_tensors(target, _as_stored(path, state), config_replace(config, name=name))
    _notify("added", name)
    return ModelEntry(name, target, "user", read_config(target))


def describe(entry: ModelEntry) -> dict:
    """A JSON-ready summary of a model (used by ``glas-seg models --json``)."""
    config, training = entry.config, entry.config.training or {}
    return {
        "name": entry.name,
        "architecture": config.architecture,
        "source": entry.source,
        "task": config.task,
        "base_model": config.base_model,
        "description": config.description,
        "created": training.get("created"),
        "iterations": training.get("iterations"),
        "validation": training.get("validation"),
        "path": str(entry.path),
        "damaged": None,
    }


def is_float16_file(path: str | Path) -> bool:
    """Whether a model file stores its floating-point weights as float16."""
    with safe_open(str(path), framework="pt") as f:
        return any(f.get_slice(k).get_dtype() == "F16" for k in f.keys())


__all__ = [
    "ModelStoreError", "subscribe", "user_models", "model_path", "check_name", "check_new_name",
    "save_user_model", "rename_model", "delete_model", "export_model", "validate_model_file",
    "import_model", "describe", "is_float16_file", "damage", "damaged_models",
]
