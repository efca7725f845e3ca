"""Export a model as a bioimage.io model package, for Fiji's DeepImageJ, ilastik and bioimageio.core.

The package is a zip holding ``rdf.yaml`` (bioimage.io model description, format 0.5), the
TorchScript weights and, when the model exports to ONNX, the ONNX weights (the same files
:func:`.export.export_model` writes and verifies), a test input and the exported model's output
on it (``.npy``, a crop of the bundled GlaS sample image), a cover image, a README and
glas-seg's JSON sidecar (:func:`.export.sidecar`).

The input is the exported network's: float32 ``(batch, channel, y, x)``, RGB in ``[0, 1]``, at
the model's *working* pixel size (the image pixel size divided by ``scale``); normalisation and
softmax are inside the weights, so the description lists no pre- or post-processing beyond a
cast to float32. The output is the softmax class probabilities; instances need glas-seg's
watershed (README in the package, docs/export.md).

Writing needs no bioimage.io library: ``rdf.yaml`` is written as JSON, which is YAML.
``tests/test_export_bioimageio.py`` validates packages with ``bioimageio.spec``.
"""

from __future__ import annotations

import json
import re
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .checkpoint import file_sha256
from .errors import GlasSegError
from .export import _check_exportable, export_model, run_exported, sidecar, working_scale_input
from .outputs import output_file, write_file

if TYPE_CHECKING:
    from .registry import LoadedModel

#: bioimage.io model description format written (0.5.x is what bioimageio.spec 0.5 validates and
#: DeepImageJ 3 / JDLL read; readers of a later 0.5 patch accept it).
FORMAT_VERSION = "0.5.4"
#: Licence of the packaged weights: glas-seg's own (pyproject.toml); the project states no other
#: licence for the weights it ships. The training data's terms are in the package README.
WEIGHTS_LICENSE = "BSD-3-Clause"
SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "glas_train_12.png"

FILES = {
    "rdf": "rdf.yaml",
    "torchscript": "weights_torchscript.pt",
    "onnx": "weights.onnx",
    "test_input": "test_input_rgb.npy",
    "test_output": "test_output_probabilities.npy",
    "cover": "cover.png",
    "sample_input": "sample_input_rgb.png",
    "sample_output": "sample_output_probabilities.png",
    "documentation": "README.md",
    "sidecar": "glas_seg_export.json",
}

CITE_GLAS = [
    {"text": "Sirinukunwattana K. et al., Gland segmentation in colon histology images: The GlaS challenge "
             "contest. Medical Image Analysis 35 (2017) 489-502 (GlaS data: training data of the gland models, "
             "test image)",
     "doi": "10.1016/j.media.2016.08.008"},
    {"text": "Sirinukunwattana K., Snead D.R.J., Rajpoot N.M., A stochastic polygons model for glandular "
             "structures in colon histology images. IEEE Transactions on Medical Imaging 34 (2015) (GlaS data)",
     "doi": "10.1109/TMI.2015.2433900"},
]
CITE_MONUSEG = {"text": "Kumar N. et al., A dataset and a technique for generalized nuclear segmentation for "
                        "computational pathology. IEEE Transactions on Medical Imaging 36 (2017) (MoNuSeg: training data)",
                "doi": "10.1109/TMI.2017.2677499"}

_UNET_FAMILY = {"unet", "unet_plus_plus", "residual_unet", "efficientnet_unet"}


def _package_name(model_name: str) -> str:
    """bioimage.io names allow letters, digits, ``_+- ()`` and 5 to 128 characters."""
    name = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", f"glas-seg {model_name}")
    return name[:128]


def _halo_and_min(multiple: int, tile_size: int, test_side: int) -> tuple[int, int]:
    """Output halo (working pixels cropped from each tile border when a consumer tiles, about
    glas-seg's own overlap) and the smallest input side: both multiples of the network stride."""
    halo = max(multiple, tile_size // 8 // multiple * multiple)
    while halo > multiple and 2 * halo + multiple > test_side:
        halo -= multiple
    return halo, 2 * halo + multiple


def _test_input(model: "LoadedModel") -> np.ndarray:
    """A centred crop of the bundled GlaS sample at the working scale, ``[0, 1]`` float32
    ``(1, 3, side, side)``, ``side`` up to 256 and a multiple of the network stride."""
    from .image_io import read_image

    rgb = working_scale_input(read_image(SAMPLE), model.config)
    multiple = int(model.network.size_multiple)
    side = min(256, rgb.shape[2], rgb.shape[3]) // multiple * multiple
    if side < multiple:
        raise GlasSegError(f"the sample image is too small for {model.config.name}'s stride {multiple}")
    top, left = (rgb.shape[2] - side) // 2, (rgb.shape[3] - side) // 2
    return np.ascontiguousarray(rgb[:, :, top:top + side, left:left + side], dtype=np.float32)


def _write_cover(path: Path, rgb: np.ndarray, probabilities: np.ndarray, threshold: float) -> None:
    """2:1 cover: the test input, and the same with the predicted foreground tinted green."""
    from PIL import Image

    image = np.clip(rgb[0].transpose(1, 2, 0) * 255 + 0.5, 0, 255).astype(np.uint8)
    foreground = (1.0 - probabilities[0, 0]) > threshold
    overlay = image.astype(np.float32)
    overlay[foreground] = 0.55 * overlay[foreground] + 0.45 * np.array([40, 220, 60], np.float32)
    cover = np.concatenate([image, overlay.astype(np.uint8)], axis=1)
    Image.fromarray(cover).save(path, format="PNG", optimize=True)


def _write_samples(files: dict, rgb: np.ndarray, probabilities: np.ndarray) -> None:
    """The test tensors as 8-bit PNGs, for people (bioimage.io's ``sample_tensor``): the input
    crop, and the probabilities as colours (red background, green interior, blue boundary)."""
    from PIL import Image

    for key, array in (("sample_input", rgb), ("sample_output", probabilities)):
        image = np.clip(array[0, :3].transpose(1, 2, 0) * 255 + 0.5, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(files[key], format="PNG", optimize=True)


def _readme(model: "LoadedModel", info: dict, halo: int, weights: list[str], side: int) -> str:
    config = model.config
    post = info["postprocessing"]
    classes = ", ".join(f"{i} = {c}" for i, c in enumerate(info["classes"]))
    validation = (config.training or {}).get("validation", {}) if isinstance(config.training, dict) else {}
    scores = ", ".join(f"{k} {v}" for k, v in validation.items()) if validation else "not recorded in the model file"
    data = ("GlaS (Warwick-QU, MICCAI 2015 gland segmentation challenge), colon H&E at 20x"
            if config.task == "glands" else "MoNuSeg 2018 training set, H&E at 40x")
    terms = ("The GlaS data are provided by their authors for research purposes only; commercial use is not "
             "allowed, and publications using them must cite the GlaS papers listed in `rdf.yaml`."
             if config.task == "glands" else
             "Check the MoNuSeg data's own terms of use and cite the MoNuSeg paper listed in `rdf.yaml`.")
    return f"""# {_package_name(config.name)}

{config.description or ("Gland" if config.task == "glands" else "Nucleus") + " segmentation in H&E histology"}: the glas-seg model
`{config.name}` (architecture `{config.architecture}`), exported by `glas-seg export --format bioimageio`.
Weights: {", ".join(weights)}.

## Input

`rgb`, float32, axes batch, channel, y, x: **RGB** in **[0, 1]** (8-bit values divided by 255).
The mean / std normalisation is inside the model: do not normalise again.

Pixel size: **{info["working_pixel_size_um"]} um/px** (the model's working resolution). The model
was trained on images at {info["image_pixel_size_um"]} um/px reduced by a factor {config.scale}
(`scale`); resample your image to {info["working_pixel_size_um"]} um/px before running it
(for {info["image_pixel_size_um"]} um/px images: resize by {config.scale}, bilinear with antialiasing).
y and x must be a multiple of {info["size_multiple"]} and at least {2 * halo + info["size_multiple"]}; tiles of about
{config.tile_size} px work best (glas-seg's default tile), and the {halo} px border of each tile
(the `halo`) is cropped when tiles are stitched.

## Output

`probabilities`, float32, axes batch, channel, y, x, same size and pixel size as the input:
softmax class probabilities, channels {classes}. Foreground = 1 - background.

## Instances (not done by the model)

glas-seg turns the probabilities into one label per {"gland" if config.task == "glands" else "nucleus"} with a marker watershed
(`glas_seg.backend.postprocess.instances_from_probabilities`), with this model's thresholds:

1. seeds: connected regions of `interior > {post["interior_threshold"]}` (`interior_threshold`),
   those under {max(1, post["min_size_working_pixels"] // 4)} px dropped;
2. mask: `1 - background > {post["foreground_threshold"]}` (`foreground_threshold`);
3. watershed of `-interior` from the seeds inside the mask; holes filled; objects under
   {post["min_size_working_pixels"]} working pixels removed (`min_size`).

Boundary class: `{post["targets"]}` ({"a band across every outline, included in the foreground" if post["targets"] == "outer" else "the objects' own outermost pixels"}).
In Fiji: threshold the foreground, seed with the thresholded interior and run a marker-controlled
watershed (e.g. MorphoLibJ). Or in Python, with glas-seg installed: `glas-seg segment` on the
original image gives the same instances at full resolution. All settings are in
`{FILES["sidecar"]}` (glas-seg's export sidecar) and under `config.glas_seg` in `rdf.yaml`.

## Validation

Recorded in the model file when it was trained or fine-tuned ({"its own held-back validation images" if validation else "none"}):
{scores}. Object F1 is the GlaS challenge's detection F1 (glas-seg docs/metrics.md); these are
not test-set numbers. To validate on your own data: run `glas-seg evaluate` on label maps from
`glas-seg segment`, or compare instances from the steps above with your annotations.

The test input is a {side} x {side} crop (working resolution) of GlaS training image `train_12`
(the sample image glas-seg ships), and the test output is this package's
TorchScript weights' output on it; glas-seg checked the exported weights against its own
PyTorch model (within 1e-4 TorchScript, 1e-3 ONNX).

## Training data and licence

Trained on {data}. {terms}
The weights are distributed under glas-seg's licence ({WEIGHTS_LICENSE}); the test tensors and
the cover are derived from a GlaS image and fall under the GlaS terms above.
"""


def export_bioimageio(
    model: "str | Path | LoadedModel",
    path: str | Path,
    *,
    mode: str | None = None,
    overwrite: bool = True,
    onnx: bool = True,
) -> Path:
    """Write a model as a bioimage.io model package (zip), for DeepImageJ, ilastik, bioimageio.core.

    Parameters
    ----------
    model : str, Path or LoadedModel
        Model name, ``.safetensors`` path or loaded model (pixel models only, as for ONNX).
    path : str or Path
        Output ``.zip`` file, written atomically.
    mode : {None, "accurate", "fast"}
        Inference mode of architectures that have several (U-Net++).
    overwrite : bool
        Replace an existing file; False refuses with :class:`GlasSegError`.
    onnx : bool
        Also package ONNX weights (skipped, TorchScript only, where the model does not export
        to ONNX).

    Returns
    -------
    Path
        The zip file.

    Raises
    ------
    GlasSegError
        Not a ``.zip`` path, an instance model, or anything :func:`.export.export_model` refuses.
    """
    import torch

    from .registry import LoadedModel, load_model

    path = Path(path)
    if path.suffix.lower() != ".zip":
        raise GlasSegError(f"a bioimage.io package is a .zip file; got {path} (use e.g. --out {path.with_suffix('.zip').name})")
    path = output_file(path, "export file")
    if not overwrite and path.exists():
        raise GlasSegError(f"{path} exists; choose another name or allow overwriting")
    if isinstance(model, LoadedModel):
        if mode is not None:
            raise GlasSegError("mode applies when export_bioimageio loads the model; pass it to load_model instead")
    else:
        model = load_model(model, "cpu", mode=mode)
    _check_exportable(model, "torchscript")
    config = model.config
    multiple = int(model.network.size_multiple)

    with tempfile.TemporaryDirectory(prefix="glas-seg-bioimageio-") as folder:
        folder = Path(folder)
        files = {key: folder / name for key, name in FILES.items()}
        export_model(model, files["torchscript"], format="torchscript")
        weights = ["TorchScript"]
        opset = None
        if onnx:
            try:
                export_model(model, files["onnx"], format="onnx")
            except GlasSegError:
                files.pop("onnx")
            else:
                import onnx as onnx_lib

                proto = onnx_lib.load(str(files["onnx"]), load_external_data=False)
                opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
                weights.append(f"ONNX (opset {opset})")
        else:
            files.pop("onnx")

        rgb = _test_input(model)
        probabilities = run_exported(files["torchscript"], rgb).astype(np.float32)
        np.save(files["test_input"], rgb)
        np.save(files["test_output"], probabilities)
        _write_cover(files["cover"], rgb, probabilities, config.foreground_threshold)
        _write_samples(files, rgb, probabilities)
        info = sidecar(model, "torchscript", FILES["torchscript"])
        files["sidecar"].write_text(json.dumps(info, indent=1))
        side = rgb.shape[2]
        halo, min_side = _halo_and_min(multiple, config.tile_size, side)
        files["documentation"].write_text(_readme(model, info, halo, weights, side))

        rdf = _rdf(model, info, files, halo, min_side, opset, torch.__version__)
        files["rdf"].write_text(json.dumps(rdf, indent=1))  # JSON is YAML 1.2: no YAML library needed


        def write(tmp: str) -> None:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for file in files.values():  # export_model's own sidecars (<file>.json) stay out
                    archive.write(file, file.name)

        write_file(path, write, "bioimage.io package")
    return path


def _rdf(model: "LoadedModel", info: dict, files: dict, halo: int, min_side: int, opset: int | None,
         torch_version: str) -> dict:
    """The ``rdf.yaml`` content (bioimage.io model description 0.5)."""
    config = model.config
    multiple = int(model.network.size_multiple)
    um = info["working_pixel_size_um"]
    # Axis scales in whole nanometres: consumers size outputs as int(size * scale / scale), which
    # a scale like 1.24 (um) makes 207.99999... for some sizes; integers keep it exact.
    nm = float(max(1, round(um * 1000)))

    def file(key: str) -> dict:
        return {"source": files[key].name, "sha256": file_sha256(files[key])}

    def space(axis: str) -> dict:
        return {"type": "space", "id": axis, "size": {"min": min_side, "step": multiple},
                "unit": "nanometer", "scale": nm}

    def space_out(axis: str) -> dict:
        return {"type": "space", "id": axis, "size": {"tensor_id": "rgb", "axis_id": axis},
                "unit": "nanometer", "scale": nm, "halo": halo}

    weights = {"torchscript": {**file("torchscript"), "pytorch_version": torch_version.split("+")[0],
                               "comment": "glas-seg export --format torchscript: normalisation and softmax included"}}
    if "onnx" in files:
        weights["onnx"] = {**file("onnx"), "opset_version": opset, "parent": "torchscript",
                           "comment": "glas-seg export --format onnx, from the same PyTorch module as the "
                                      "TorchScript weights (checked against it within 1e-3)"}
    task = config.task
    tags = ["2d", "pytorch", "histopathology", "h-and-e", "brightfield", "transmission-light-microscopy",
            "whole-slide-imaging", "tissue", "semantic-segmentation", "deepimagej", "glas-seg", config.architecture]
    tags += ["glands", "colon", "glas"] if task == "glands" else ["nuclei"]
    if config.architecture in _UNET_FAMILY:
        tags.append("unet")
    cite = list(CITE_GLAS) + ([CITE_MONUSEG] if task == "nuclei" else [])
    classes = list(info["classes"])
    post = info["postprocessing"]
    thing = "glands in colon" if task == "glands" else "nuclei in"
    description = (f"Segments {thing} H&E histology: softmax probabilities of {', '.join(classes)} per pixel, "
                   f"at {um} um/px; glas-seg model {config.name} ({config.architecture}). Instances: glas-seg's "
                   "watershed with the thresholds in config.glas_seg (README).")[:512]
    return {
        "format_version": FORMAT_VERSION,
        "type": "model",
        "name": _package_name(config.name),
        "description": description,
        "authors": [{"name": "glas-seg project"}],
        "cite": cite,
        "license": WEIGHTS_LICENSE,
        "tags": tags,
        "documentation": FILES["documentation"],
        "covers": [FILES["cover"]],
        "attachments": [file("sidecar")],
        "inputs": [{
            "id": "rgb",
            "description": f"RGB in [0, 1] (8-bit / 255) at {um} um/px; normalisation is inside the model",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["R", "G", "B"]}, space("y"), space("x")],
            "data": {"type": "float32", "range": [0.0, 1.0]},
            "test_tensor": file("test_input"),
            "sample_tensor": file("sample_input"),
            "preprocessing": [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}],
        }],
        "outputs": [{
            "id": "probabilities",
            "description": f"softmax class probabilities: {', '.join(classes)}",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": classes}, space_out("y"), space_out("x")],
            "data": {"type": "float32", "range": [0.0, 1.0]},
            "test_tensor": file("test_output"),
            "sample_tensor": file("sample_output"),
        }],
        "weights": weights,
        "config": {"glas_seg": {
            "model": config.name, "architecture": config.architecture, "task": task,
            "scale": config.scale, "image_pixel_size_um": info["image_pixel_size_um"],
            "working_pixel_size_um": um, "tile_size": config.tile_size, "size_multiple": multiple,
            "postprocessing": post,
        }},
    }


__all__ = ["export_bioimageio", "FORMAT_VERSION", "WEIGHTS_LICENSE"]
