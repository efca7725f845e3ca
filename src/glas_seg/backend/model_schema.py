"""What a model file must hold: its configuration and weights checked against what glas-seg can run.

A model file is data from outside (a colleague's export, a download, a file copied into the
store by hand), so nothing in it is trusted: every configuration field is checked for type,
length and range, and every tensor for name, shape, dtype and finiteness against the network
its architecture builds. Each fault gets its own short phrase and all faults of a file are
reported together on one line, as a :class:`.errors.GlasSegError`. The checks run when a file
is imported into the store and again whenever one is read (listing, loading, fine-tuning), so
a file damaged or edited after import is refused with the same message instead of crashing
later with a tensor-size error or, worse, segmenting garbage.
"""

from __future__ import annotations

import dataclasses
import json
import math
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, Mapping

from .checkpoint import FORMAT_VERSION, ModelConfig
from .errors import GlasSegError

if TYPE_CHECKING:  # reading a configuration (listing models) must not import torch
    import torch

TASKS = ("glands", "nuclei")
TARGETS = ("outer", "inner")
# Working scale relative to the input image: below 0.05 a 775 px GlaS image is 39 px, above 4
# a tile of 384 network pixels covers 96 image pixels; neither segments anything useful.
SCALE_RANGE = (0.05, 4.0)
# Tile side in network pixels: below 16 no network here has room for one stride-16 feature;
# above 8192 one tile of a U-Net needs tens of GB.
TILE_RANGE = (16, 8192)
# Micrometres per input pixel: 0.05 is beyond any light microscope's sampling, 20 is a 0.5x
# overview; outside that range the number is a unit mistake (nm, mm) rather than a pixel size.
MPP_RANGE = (0.05, 20.0)
# Post-processing probability thresholds: at 0 or 1 every pixel (or none) passes.
THRESHOLD_RANGE = (0.01, 0.99)
# Pixel classifiers output background / interior / boundary, which the watershed reads by index.
PIXEL_CLASSES = 3
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# Field annotations (strings, from ``from __future__ import annotations``) -> accepted JSON types.
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "str | None": (str, type(None)), "dict": (dict,), "float": (Real,), "int": (Integral,),
    "tuple": (list, tuple), "bool": (bool,), "float | None": (Real, type(None)),
}
_TYPE_WORDS = {"str": "a string", "str | None": "a string or null", "dict": "an object", "float": "a number",
               "int": "an integer", "tuple": "a list", "bool": "true or false", "float | None": "a number or null"}


def _type_fault(key: str, value: Any, annotation: str) -> str | None:
    accepted = _TYPES.get(annotation)
    if accepted is None:  # a field added later with a type this table does not know: its own check applies
        return None
    # bool is an int in Python but never a sensible number, size or scale here.
    ok = isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)
    return None if ok else f"{key} must be {_TYPE_WORDS[annotation]}, not {type(value).__name__}"


def _number_list_fault(key: str, value, positive: bool) -> str | None:
    if len(value) != 3 or not all(isinstance(v, Real) and not isinstance(v, bool) for v in value):
        return f"{key} must be 3 numbers (one per RGB channel), got {len(value)} value(s)"
    if not all(math.isfinite(v) for v in value):
        return f"{key} must be finite"
    if positive and min(value) <= 0:
        return f"{key} must be greater than 0 (it divides the image)"
    return None


def _range_fault(key: str, value, low, high) -> str | None:
    if not (math.isfinite(value) and low <= value <= high):
        return f"{key} {value!r} is out of range [{low}, {high}]"
    return None


def config_faults(data: Mapping[str, Any]) -> list[str]:
    """Every fault of a model configuration, one short phrase each (empty when valid).

    Parameters
    ----------
    data : mapping
        The configuration as stored (JSON object) or ``dataclasses.asdict`` of a
        :class:`.checkpoint.ModelConfig`. Keys this version does not know are ignored, so that
        files written by a later version with extra fields still load.

    Returns
    -------
    list of str
    """
    from .models import ARCHITECTURES, INSTANCE_ARCHITECTURES

    faults = []
    bad = set()  # fields already reported are not checked further
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in data:
            if required:
                faults.append(f"{name} is missing")
            continue
        fault = _type_fault(name, data[name], str(f.type))
        if fault:
            faults.append(fault)
            bad.add(name)

    def check(key: str) -> bool:
        return key in data and key in fields and key not in bad

    version = data.get("format_version", FORMAT_VERSION)
    if not isinstance(version, Integral) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        faults.append(f"format_version {version!r} is not one this glas-seg reads (1 to {FORMAT_VERSION}); "
                      "update glas-seg")
    if check("name") and not data["name"].strip():
        faults.append("name is empty")
    if check("architecture") and data["architecture"] not in ARCHITECTURES:
        faults.append(f"cannot build architecture {data['architecture']!r}: it is unknown "
                      f"(known: {', '.join(sorted(ARCHITECTURES))})")
    if check("arch_kwargs") and not all(isinstance(k, str) and k.isidentifier() for k in data["arch_kwargs"]):
        faults.append("arch_kwargs keys must be argument names")
    if check("task") and data["task"] not in TASKS:
        faults.append(f"unknown task {data['task']!r} (expected one of {', '.join(TASKS)})")
    if check("targets") and data["targets"] not in TARGETS:
        faults.append(f"unknown targets {data['targets']!r} (expected one of {', '.join(TARGETS)})")
    if check("scale"):
        faults.append(_range_fault("scale", data["scale"], *SCALE_RANGE))
    for key in ("mean", "std"):
        if check(key):
            faults.append(_number_list_fault(key, data[key], positive=key == "std"))
    if check("class_names"):
        names = data["class_names"]
        instance = isinstance(data.get("architecture"), str) and data["architecture"] in INSTANCE_ARCHITECTURES
        if not all(isinstance(n, str) for n in names):
            faults.append("class_names must all be strings")
        elif not instance and len(names) != PIXEL_CLASSES:
            faults.append(f"class_names must name {PIXEL_CLASSES} classes (background, interior, boundary) "
                          f"for a pixel classifier, got {len(names)}")
        elif instance and len(names) < 2:
            faults.append("class_names must name at least background and one object class")
        kwargs = data.get("arch_kwargs")
        classes = kwargs.get("num_classes") if isinstance(kwargs, dict) else None
        if not instance and classes is not None and classes != len(names):
            faults.append(f"arch_kwargs num_classes {classes!r} differs from the {len(names)} class_names")
    if check("tile_size"):
        faults.append(_range_fault("tile_size", data["tile_size"], *TILE_RANGE))
    if check("mpp") and data["mpp"] is not None:
        faults.append(_range_fault("mpp", data["mpp"], *MPP_RANGE))
    for key in ("interior_threshold", "foreground_threshold"):
        if check(key):
            faults.append(_range_fault(key, data[key], *THRESHOLD_RANGE))
    if check("min_size") and data["min_size"] < 0:
        faults.append(f"min_size {data['min_size']} must be 0 or more")
    return [fault for fault in faults if fault]


def _raise_faults(source: str, faults: list[str]) -> None:
    if faults:
        raise GlasSegError(f"{source}: invalid model configuration: {'; '.join(faults)}")


def config_from_header(text: str, source: str) -> ModelConfig:
    """Parse and check the JSON configuration stored in a model file's header.

    Parameters
    ----------
    text : str
        The header's configuration string.
    source : str
        What to call the file in messages (its name).

    Raises
    ------
    GlasSegError
        Not JSON, not a JSON object, or any fault :func:`config_faults` finds.
    """
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise GlasSegError(f"{source} has a damaged configuration (not JSON: {exc})") from None
    if not isinstance(data, dict):
        raise GlasSegError(f"{source} has a damaged configuration (a JSON {type(data).__name__}, not an object)")
    _raise_faults(source, config_faults(data))
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    values = {k: tuple(v) if isinstance(v, list) and str(fields[k].type) == "tuple" else v
              for k, v in data.items() if k in fields}
    return ModelConfig(**values)


def check_config(config: ModelConfig, source: str = "model") -> ModelConfig:
    """Check a configuration made in code (``glas-seg train`` options, the API); returns it.

    Raises
    ------
    GlasSegError
    """
    _raise_faults(source, config_faults(dataclasses.asdict(config)))
    return config


def expected_weights(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Name -> (shape, is floating point) of every tensor the configuration's network holds.

    The network is built on PyTorch's ``meta`` device, so no memory is allocated whatever
    size the configuration claims.

    Raises
    ------
    GlasSegError
        The architecture cannot be built with the stored ``arch_kwargs``.
    """
    import torch

    from .registry import build_model

    try:
        with torch.device("meta"):
            network = build_model(config)
    except GlasSegError:
        raise
    except (TypeError, ValueError, RuntimeError, ArithmeticError) as exc:
        # Builders raise all of these for impossible sizes (negative widths, zero depth...).
        raise GlasSegError(f"architecture {config.architecture} cannot be built with arch_kwargs "
                           f"{json.dumps(config.arch_kwargs)} ({' '.join(str(exc).split())})") from None
    return {k: (tuple(v.shape), v.is_floating_point()) for k, v in network.state_dict().items()}


def weight_faults(expected: Mapping[str, tuple[tuple, bool]], stored: Mapping[str, tuple[tuple, bool]]) -> list[str]:
    """Missing, unexpected, misshaped and wrongly typed tensors, one phrase per kind.

    Parameters
    ----------
    expected, stored : mapping of name -> (shape, is floating point)
    """
    def listed(keys):
        return f"{', '.join(keys[:3])}{'...' if len(keys) > 3 else ''}"

    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    common = sorted(set(expected) & set(stored))
    wrong = [k for k in common if tuple(expected[k][0]) != tuple(stored[k][0])]
    # Integer weights would be cast silently into float parameters and segment garbage.
    dtype = [k for k in common if expected[k][1] != stored[k][1]]
    faults = [f"{label}: {listed(keys)}" for label, keys in
              (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if keys]
    if dtype:
        faults.append(f"wrong dtype (floating point expected or not): {listed(dtype)}")
    return faults


def check_weights(source: str, config: ModelConfig, state: Mapping[str, "torch.Tensor"]) -> None:
    """Check loaded tensors against the configuration's network: names, shapes, dtypes, finite values.

    Raises
    ------
    GlasSegError
    """
    import torch

    stored = {k: (tuple(v.shape), v.is_floating_point()) for k, v in state.items()}
    faults = weight_faults(expected_weights(config), stored)
    if faults:
        raise GlasSegError(f"{source}: its weights do not fit architecture {config.architecture!r} "
                           f"({'; '.join(faults)})")
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise GlasSegError(f"{source}: weight {key} holds NaN or infinite values")


def stored_weights(safe_file) -> dict[str, tuple[tuple, bool]]:
    """Name -> (shape, is floating point) from an open safetensors file, without reading the tensors."""
    out = {}
    for key in safe_file.keys():
        piece = safe_file.get_slice(key)
        out[key] = (tuple(piece.get_shape()), piece.get_dtype() in FLOAT_DTYPES)
    return out


__all__ = ["TASKS", "TARGETS", "SCALE_RANGE", "TILE_RANGE", "config_faults", "config_from_header", "check_config",
           "expected_weights", "weight_faults", "check_weights", "stored_weights"]
