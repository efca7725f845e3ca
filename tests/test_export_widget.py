"""Exporting a model from the Segment widget (runs under Xvfb)."""

import json

import pytest

from glas_seg._widget_segment import SegmentWidget
from glas_seg.backend.export import sidecar_path
from glas_seg.backend.registry import DEFAULT_MODEL

pytestmark = pytest.mark.gui


def export_and_wait(qtbot, w, path=None) -> str:
    with qtbot.waitSignal(w.task.finished, timeout=60000) as blocker:
        w.export_model(path)
    return blocker.args[0]


def test_export_button_writes_the_selected_model(docked, qtbot, tmp_path, monkeypatch):
    _, w = docked(SegmentWidget)
    assert w.model.value == DEFAULT_MODEL and w.export_button in list(w)
    from qtpy.QtWidgets import QFileDialog

    # The file dialog: a name without suffix, the TorchScript filter chosen -> model.pt
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        staticmethod(lambda *a, **k: (str(tmp_path / "model"), "TorchScript, for QuPath / Fiji (*.pt)")))
    assert export_and_wait(qtbot, w) == "done"
    written = tmp_path / "model.pt"
    assert written.is_file() and json.loads(sidecar_path(written).read_text())["format"] == "torchscript"
    assert str(written) in w.status.value

    w.model.value = "maskrcnn-glands"  # detections, not probabilities: refused with a message
    assert export_and_wait(qtbot, w, str(tmp_path / "m.onnx")) == "failed"
    assert "cannot be exported" in w.status.value and not (tmp_path / "m.onnx").exists()


def test_cancelled_export_leaves_no_file(docked, qtbot, tmp_path):
    _, w = docked(SegmentWidget)
    with qtbot.waitSignal(w.task.finished, timeout=60000) as blocker:
        w.export_model(str(tmp_path / "u.pt"))
        w.task.cancel()  # what the Cancel button does
    assert blocker.args[0] == "cancelled"
    assert list(tmp_path.iterdir()) == []


def test_zip_exports_a_bioimageio_package(docked, qtbot, tmp_path, monkeypatch):
    import zipfile

    from qtpy.QtWidgets import QFileDialog

    _, w = docked(SegmentWidget)
    w.model.value = "unet-glands"
    # The bioimage.io filter chosen, a name without suffix -> a .zip package (docs/export.md)
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(
        lambda *a, **k: (str(tmp_path / "model"), "bioimage.io package, for Fiji / DeepImageJ (*.zip)")))
    assert export_and_wait(qtbot, w) == "done"
    written = tmp_path / "model.zip"
    assert zipfile.is_zipfile(written) and "rdf.yaml" in zipfile.ZipFile(written).namelist()
    assert "bioimageio" in w.status.value and list(tmp_path.iterdir()) == [written]
