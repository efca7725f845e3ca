"""Export a model for other runtimes: TorchScript (QuPath / Deep Java Library, Fiji) and ONNX.

The exported network carries its own normalisation and softmax, so that a runtime that knows
nothing about glas-seg only has to resample the image and scale 8-bit values to ``[0, 1]``:

* input ``rgb``: float32 ``(N, 3, H, W)``, RGB, values in ``[0, 1]`` (8-bit values divided by
  255), at the model's working scale (the image resized by ``scale`` from the sidecar, e.g. 0.5
  for the GlaS gland models), ``H`` and ``W`` multiples of ``size_multiple``;
* output ``probabilities``: float32 ``(N, C, H, W)`` softmax class probabilities, channels as
  ``classes`` in the sidecar (background, interior, boundary).

Next to the model file a JSON sidecar (``<file>.json``) records everything needed to use it
the way glas-seg does: classes, working scale and pixel size, tile size, size multiple,
normalisation and the post-processing settings (minimum object size, thresholds, targets mode).
Instance networks (Mask R-CNN) return detections, not probabilities, and are refused.
``format="bioimageio"`` packages the TorchScript and ONNX files as a bioimage.io model zip
(Fiji's DeepImageJ, ilastik): :mod:`.export_bioimageio`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import dataclasses
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import GlasSegError
from .outputs import output_file, write_file

if TYPE_CHECKING:
    import torch

    from .checkpoint import ModelConfig
    from .registry import LoadedModel

#: "bioimageio" is a zip package around the TorchScript (and ONNX) file: .export_bioimageio.
FORMATS = ("torchscript", "onnx", "bioimageio")
SIDECAR_VERSION = 1
ONNX_OPSET = 17  # onnxruntime >= 1.12, OpenCV's DNN module and DJL's ONNX engine all read it


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of an exported model file: ``unet.onnx`` -> ``unet.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _wrapped(model: "LoadedModel") -> "torch.nn.Module":
    """The network between glas-seg's normalisation and a softmax, on the CPU in eval mode."""
    import torch

    class Exported(torch.nn.Module):
        """``[0, 1]`` RGB ``(N, 3, H, W)`` -> class probabilities ``(N, C, H, W)``."""

        def __init__(self, network: torch.nn.Module, mean, std) -> None:
            super().__init__()
            self.network = network
            # Buffers, not constants: they are saved with the weights and move with the module.
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, rgb: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.network((rgb - self.mean) / self.std), dim=1)

    # A copy: the caller's model stays on its device (exports are traced on the CPU in float32).
    network = copy.deepcopy(model.network).to("cpu").float().eval()
    return Exported(network, model.config.mean, model.config.std).eval()


def sidecar(model: "LoadedModel", fmt: str, file_name: str) -> dict:
    """What another runtime needs to use the exported model as glas-seg does (JSON-ready).

    Parameters
    ----------
    model : LoadedModel
    fmt : {"torchscript", "onnx"}
    file_name : str
        Name of the exported model file the sidecar describes.
    """
    from .checkpoint import model_mpp

    config = model.config
    multiple = int(model.network.size_multiple)
    mpp = model_mpp(config)  # the model's own, or its task's training data's (the one fallback)
    return {
        "sidecar_version": SIDECAR_VERSION,
        "format": fmt,
        "file": file_name,
        "model": config.name,
        "architecture": config.architecture,
        "task": config.task,
        "classes": list(config.class_names),
        "input": {
            "name": "rgb", "layout": "NCHW", "dtype": "float32", "channels": "RGB", "range": [0.0, 1.0],
            "note": "8-bit images divided by 255; normalisation (mean, std) happens inside the model",
            "scale": config.scale,
            "size_multiple": multiple,
        },
        "output": {"name": "probabilities", "layout": "NCHW", "dtype": "float32",
                   "kind": "softmax class probabilities, channels as 'classes'"},
        "scale": config.scale,
        "image_pixel_size_um": mpp,
        "working_pixel_size_um": round(mpp / config.scale, 4),
        "tile_size": config.tile_size,
        "size_multiple": multiple,
        "normalisation": {"mean": list(config.mean), "std": list(config.std), "applied": "inside the model"},
        "postprocessing": {
            "method": "marker watershed on the interior probability (glas_seg.backend.postprocess)",
            # The model's own (ModelConfig), so that other runtimes repeat its watershed.
            "interior_threshold": config.interior_threshold,
            "foreground_threshold": config.foreground_threshold,
            "min_size_image_pixels": config.min_size,
            "min_size_working_pixels": max(1, round(config.min_size * config.scale**2)),
            "targets": config.targets,
        },
        "glas_seg_config": dataclasses.asdict(config),
    }


def _check_exportable(model: "LoadedModel", fmt: str) -> None:
    from .models import get_architecture

    if fmt not in FORMATS:
        raise GlasSegError(f"Unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")
    if get_architecture(model.config.architecture).predicts_instances:
        raise GlasSegError(f"{model.config.name} ({model.config.architecture}) detects instances and returns "
                           "detections, not per-pixel probabilities; it cannot be exported. Export a pixel model "
                           "(unet-glands, unetpp-glands, ...) instead")


def _example_input(multiple: int, tile_size: int, batch: int = 1) -> "torch.Tensor":
    """A deterministic ``[0, 1]`` input, one tile (a multiple of the network's stride)."""
    import torch

    side = max(multiple, min(tile_size, 256) // multiple * multiple)
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, side, side, generator=generator)


def _write_torchscript(wrapped: "torch.nn.Module", example: "torch.Tensor", path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        # torch.jit is deprecated upstream but still the format QuPath's DJL and DeepImageJ load.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes read inside forward: checked below
        with torch.no_grad():
            traced = torch.jit.trace(wrapped, example, check_trace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        write_file(path, lambda tmp: torch.jit.save(traced, tmp), "TorchScript model")


@contextlib.contextmanager
def _quiet_output():
    """Silence file descriptors 1 and 2 for a while: when the TorchScript-based ONNX exporter
    meets an operator it cannot translate, its C++ side prints the whole graph before raising,
    and the torch.export-based one prints its steps."""
    import sys

    streams = (sys.stdout, sys.stderr)
    for stream in streams:
        stream.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(io.StringIO()):
            for fd in (1, 2):
                os.dup2(null.fileno(), fd)
            yield
    finally:
        for fd, copy_ in zip((1, 2), saved):
            os.dup2(copy_, fd)
            os.close(copy_)


def _write_onnx(wrapped: "torch.nn.Module", example: "torch.Tensor", path: Path) -> None:
    import torch

    axes = {0: "batch", 2: "height", 3: "width"}

    def legacy(tmp: str) -> None:
        # The TorchScript-based exporter first: the torch.export-based one gives the same numbers
        # but took 200 s instead of 0.5 s on efficientnet_unet, whose timm encoder's "same"
        # padding fills the graph with symbolic shape guards.
        torch.onnx.export(wrapped, (example,), tmp, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["rgb"], output_names=["probabilities"],
                          dynamic_axes={"rgb": axes, "probabilities": axes})

    def dynamo(tmp: str) -> None:
        # For operators only the new exporter translates (Micro-Net's antialiased resize).
        dynamic = torch.export.Dim.DYNAMIC
        program = torch.onnx.export(wrapped, (example,), dynamo=True, opset_version=max(ONNX_OPSET, 18),
                                    input_names=["rgb"], output_names=["probabilities"], verbose=False,
                                    dynamic_shapes={"rgb": {0: dynamic, 2: dynamic, 3: dynamic}})
        program.save(tmp, external_data=False)

    with warnings.catch_warnings(), _quiet_output():
        warnings.simplefilter("ignore")  # deprecation and tracer notes; the result is checked by _verify
        try:
            write_file(path, legacy, "ONNX model")
        except torch.onnx.errors.UnsupportedOperatorError:
            try:
                write_file(path, dynamo, "ONNX model")
            except Exception as exc:  # the exporter's own errors are many types; the message says what
                raise GlasSegError(f"this model cannot be exported to ONNX ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}); export TorchScript instead") from exc


def run_exported(path: str | Path, rgb: np.ndarray) -> np.ndarray:
    """Run an exported model file on a batch, as another runtime would.

    Parameters
    ----------
    path : path
        A ``.pt`` TorchScript file (by torch.jit) or an ONNX file (by onnxruntime on the CPU),
        told apart by the sidecar's ``format`` or, without one, by the suffix ``.onnx``.
    rgb : float32 ndarray ``(N, 3, H, W)`` in ``[0, 1]`` at the working scale

    Returns
    -------
    float32 ndarray ``(N, C, H, W)``: class probabilities
    """
    path = Path(path)
    meta = sidecar_path(path)
    fmt = json.loads(meta.read_text())["format"] if meta.is_file() else ("onnx" if path.suffix == ".onnx" else "torchscript")
    rgb = np.ascontiguousarray(rgb, dtype=np.float32)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["probabilities"], {"rgb": rgb})[0]
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated upstream, still what DJL reads
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(rgb)).numpy()


def _verify(wrapped: "torch.nn.Module", path: Path, multiple: int, tolerance: float) -> float:
    """Largest difference between the file and PyTorch on an input of another size than the
    traced one (a trace that froze a shape would fail here); GlasSegError above ``tolerance``."""
    import torch

    generator = torch.Generator().manual_seed(1)
    check = torch.rand(2, 3, 2 * multiple, 3 * multiple, generator=generator)
    with torch.no_grad():
        expected = wrapped(check).numpy()
    got = run_exported(path, check.numpy())
    difference = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not difference <= tolerance:
        raise GlasSegError(f"the exported {path.name} does not reproduce the model (largest probability "
                           f"difference {difference:.2g} > {tolerance:g}); please report this")
    return difference


def export_model(
    model: "str | Path | LoadedModel",
    path: str | Path,
    *,
    format: str = "onnx",
    mode: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a model as TorchScript or ONNX, normalisation and softmax included, plus a JSON sidecar.

    Parameters
    ----------
    model : str, Path or LoadedModel
        Model name (bundled or user), ``.safetensors`` path, or a loaded model.
    path : str or Path
        Output file (``.pt`` for TorchScript, ``.onnx`` for ONNX by convention); the sidecar is
        written next to it as ``<path>.json``.
    format : {"onnx", "torchscript", "bioimageio"}
        ``"bioimageio"`` writes a bioimage.io model package (``.zip``, for Fiji's DeepImageJ) with
        :func:`.export_bioimageio.export_bioimageio` instead; no sidecar is written next to it.
    mode : {None, "accurate", "fast"}
        Inference mode of architectures that have several (U-Net++); None keeps the model's own.
    overwrite : bool
        Replace an existing file; False refuses with :class:`GlasSegError`.

    Returns
    -------
    Path
        The model file. Its input is float32 ``(N, 3, H, W)`` RGB in ``[0, 1]`` at the model's
        working scale (sidecar ``scale``), ``H`` and ``W`` multiples of sidecar ``size_multiple``;
        its output float32 ``(N, C, H, W)`` softmax probabilities.

    Raises
    ------
    GlasSegError
        Unknown format or model, an instance (detection) model, an output path that cannot be
        written, or an exported file that does not reproduce the model (checked after writing,
        within 1e-4 for TorchScript and 1e-3 for ONNX, on another input size than the traced one).
    """
    import torch

    from .registry import LoadedModel, load_model

    if format not in FORMATS:
        raise GlasSegError(f"Unknown export format {format!r}; use one of: {', '.join(FORMATS)}")
    if format == "bioimageio":
        from .export_bioimageio import export_bioimageio

        return export_bioimageio(model, path, mode=mode, overwrite=overwrite)
    path = output_file(path, "export file")
    if not overwrite and path.exists():
        raise GlasSegError(f"{path} exists; choose another name or allow overwriting")
    if isinstance(model, LoadedModel):
        if mode is not None:
            raise GlasSegError("mode applies when export_model loads the model; pass it to load_model instead")
    else:
        model = load_model(model, "cpu", mode=mode)
    _check_exportable(model, format)
    wrapped = _wrapped(model)
    multiple = int(model.network.size_multiple)
    example = _example_input(multiple, model.config.tile_size)
    if format == "torchscript":
        _write_torchscript(wrapped, example, path)
    else:
        _write_onnx(wrapped, example, path)
    try:
        _verify(wrapped, path, multiple, 1e-4 if format == "torchscript" else 1e-3)
    except BaseException:
        path.unlink(missing_ok=True)  # a file that does not reproduce the model is worse than none
        raise
    info = sidecar(model, format, path.name)
    write_file(sidecar_path(path), lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)), "export sidecar")
    return path


def working_scale_input(image: np.ndarray, config: "ModelConfig") -> np.ndarray:
    """An image as the exported model takes it: ``[0, 1]`` RGB at the working scale, not normalised.

    The same resampling as :func:`.inference.prepare_input` (which normalises too): it is called
    with mean 0 and std 1, so that both paths share one implementation.

    Parameters
    ----------
    image : ndarray ``(H, W[, C])``, any dtype :func:`.image_io.to_float_rgb` accepts
    config : ModelConfig

    Returns
    -------
    float32 ndarray ``(1, 3, h, w)``, ``h = round(H * scale)`` (not padded to the size multiple)
    """
    from .checkpoint import config_replace
    from .inference import prepare_input
    from .registry import LoadedModel

    plain = config_replace(config, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return prepare_input(image, LoadedModel(None, plain, None)).numpy()


__all__ = ["export_model", "run_exported", "sidecar", "sidecar_path", "working_scale_input", "FORMATS"]
