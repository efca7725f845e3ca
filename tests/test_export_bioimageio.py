"""bioimage.io model packages (glas-seg export --format bioimageio): valid for bioimageio.spec,
offline, and their test output is glas-seg's own."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from glas_seg.backend.errors import GlasSegError
from glas_seg.backend.export import FORMATS, export_model, run_exported, working_scale_input
from glas_seg.backend.export_bioimageio import FILES, FORMAT_VERSION, SAMPLE, WEIGHTS_LICENSE
from glas_seg.backend.image_io import read_image
from glas_seg.backend.inference import prepare_input
from glas_seg.backend.registry import load_model
from glas_seg.cli import build_parser, main

MODEL = "unet-glands"  # the fastest bundled model to export; stride 16, scale 0.5


@pytest.fixture(scope="module")
def package(tmp_path_factory, one_torch_thread):
    return export_model(MODEL, tmp_path_factory.mktemp("bioimageio") / "unet.zip", format="bioimageio")


def _array(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    with archive.open(name) as f:
        return np.load(f)


def test_package_is_valid_for_bioimageio_spec_offline(package, tmp_path, monkeypatch):
    import httpx
    from bioimageio.spec import load_description, settings

    tried = []

    def no_network(*args, **kwargs):  # bioimageio.spec turns some errors into warnings: also recorded
        tried.append(args[:2])
        raise AssertionError(f"bioimageio.spec tried the network: {args[:2]}")

    for name in ("request", "get", "head", "stream", "post"):  # every URL check goes through these
        monkeypatch.setattr(httpx, name, no_network)
    monkeypatch.setattr(settings, "cache_path", tmp_path / "cache")
    # perform_io_checks: every file in the zip is opened and its sha256 compared, the test
    # tensors checked against the axes (sizes, halo, dtype), the README and cover read.
    description = load_description(package, perform_io_checks=True)
    summary = description.validation_summary
    errors = [(e.loc, e.msg) for d in summary.details for e in d.errors]
    assert summary.status == "valid-format", (summary.status, errors)
    assert type(description).__name__ == "ModelDescr" and not errors
    assert str(description.inputs[0].id) == "rgb" and str(description.outputs[0].id) == "probabilities"
    assert description.weights.torchscript is not None and description.weights.onnx is not None
    assert tried == [] and list(tmp_path.glob("cache/**/*.*")) == []  # nothing fetched, nothing cached


def test_package_contents(package):
    with zipfile.ZipFile(package) as archive:
        assert sorted(archive.namelist()) == sorted(FILES.values())
        rdf = json.loads(archive.read(FILES["rdf"]))  # written as JSON, which is YAML
        readme = archive.read(FILES["documentation"]).decode()
        sidecar = json.loads(archive.read(FILES["sidecar"]))
    config = load_model(MODEL, "cpu").config
    assert rdf["format_version"] == FORMAT_VERSION and rdf["type"] == "model"
    assert rdf["license"] == WEIGHTS_LICENSE and rdf["authors"] == [{"name": "glas-seg project"}]
    assert "10.1016/j.media.2016.08.008" in [c["doi"] for c in rdf["cite"]]
    axes = rdf["inputs"][0]["axes"]
    assert [a["type"] for a in axes] == ["batch", "channel", "space", "space"]
    assert axes[1]["channel_names"] == ["R", "G", "B"] and rdf["inputs"][0]["data"]["range"] == [0.0, 1.0]
    assert axes[2]["unit"] == "nanometer" and axes[2]["scale"] == 1240.0  # 0.62 um/px / scale 0.5
    assert axes[2]["size"]["step"] == sidecar["size_multiple"] == 16
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["background", "interior", "boundary"]
    post = rdf["config"]["glas_seg"]["postprocessing"]
    assert post["interior_threshold"] == config.interior_threshold and post == sidecar["postprocessing"]
    assert "interior_threshold" in readme and "1.24 um/px" in readme and "## Validation" in readme


def test_package_test_output_is_glas_segs_own(package, tmp_path):
    """The package's test tensors: a crop of the bundled sample at the working scale, and the
    probabilities that glas-seg's own PyTorch model and its own exports give on it."""
    with zipfile.ZipFile(package) as archive:
        rgb, expected = _array(archive, FILES["test_input"]), _array(archive, FILES["test_output"])
        archive.extract(FILES["onnx"], tmp_path)
    assert rgb.dtype == expected.dtype == np.float32 and rgb.shape[:2] == (1, 3) and expected.shape[1] == 3
    model = load_model(MODEL, "cpu")
    image = read_image(SAMPLE)
    full = working_scale_input(image, model.config)
    top, left = (full.shape[2] - rgb.shape[2]) // 2, (full.shape[3] - rgb.shape[3]) // 2
    assert np.array_equal(rgb, full[:, :, top:top + rgb.shape[2], left:left + rgb.shape[3]])
    normalised = prepare_input(image, model)[:, :, top:top + rgb.shape[2], left:left + rgb.shape[3]]
    with torch.no_grad():
        pytorch = torch.softmax(model.network(normalised), dim=1).numpy()
    assert np.abs(expected - pytorch).max() <= 1e-4
    torchscript = export_model(model, tmp_path / "u.pt", format="torchscript")
    assert np.abs(expected - run_exported(torchscript, rgb)).max() <= 1e-4
    assert np.abs(expected - run_exported(tmp_path / FILES["onnx"], rgb)).max() <= 1e-3  # the packaged ONNX
    assert (expected[0, 0] > 0.9).mean() > 0.05 and (expected[0, 1] > 0.9).mean() > 0.05  # not a blank crop


def test_cli_writes_a_package_and_refuses_other_suffixes(tmp_path, capsys):
    out = tmp_path / "deep" / "unet.zip"
    assert main(["export", MODEL, "--format", "bioimageio", "--out", str(out)]) == 0
    assert zipfile.is_zipfile(out) and str(out) in capsys.readouterr().err
    assert [p.name for p in out.parent.iterdir()] == ["unet.zip"]  # no temporary file, no sidecar
    for bad in ("unet.onnx", "unet"):
        assert main(["export", MODEL, "--format", "bioimageio", "--out", str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("glas-seg: error:") and ".zip" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / bad).exists()
    with pytest.raises(GlasSegError, match="detections"):
        export_model("maskrcnn-glands", tmp_path / "m.zip", format="bioimageio")
    assert not (tmp_path / "m.zip").exists()
    export = next(a for a in build_parser()._subparsers._group_actions[0].choices["export"]._actions
                  if a.dest == "format")
    assert tuple(export.choices) == FORMATS  # the CLI offers every format the backend writes
