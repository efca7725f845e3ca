"""Metrics widget with a real napari viewer (runs under Xvfb)."""

import json

import numpy as np
import pytest
from conftest import run_and_wait

from glas_seg._sample_data import glas_sample
from glas_seg._widget_metrics import MetricsWidget, format_value

pytestmark = pytest.mark.gui


@pytest.fixture
def widget(docked):
    return docked(MetricsWidget)


def squares():
    """Ground truth: two squares. Prediction: the first shifted 2 rows, a false blob, the second missed."""
    gt = np.zeros((40, 40), np.int32)
    gt[5:15, 5:15], gt[5:15, 25:35] = 1, 2
    pred = np.zeros_like(gt)
    pred[7:17, 5:15], pred[30:34, 30:34] = 300, 301
    return pred, gt


def table_column(w, column=0):
    value = w.table.value
    return dict(zip(value["index"], (row[column] for row in value["data"])))


def test_scores_errors_and_export(widget, qtbot, tmp_path):
    viewer, w = widget
    pred, gt = squares()
    viewer.add_labels(gt, name="truth_anno")
    viewer.add_labels(pred, name="model output")
    assert w.ground_truth.value.name == "truth_anno" and w.prediction.value.name == "model output"
    assert run_and_wait(qtbot, w) == "done"
    rows = table_column(w)
    # TP = the shifted square; FP = the blob; FN = the missed square: F1 = 2/(2+1+1).
    assert rows["Object F1"] == "0.500"
    assert (rows["True positives"], rows["False positives"], rows["False negatives"]) == ("1", "1", "1")
    # S side 100/116 * 0.8, G side 0.5 * 0.8: object Dice = (0.6897 + 0.4) / 2.
    assert rows["Object Dice"] == f"{0.5 * (100 / 116 * 0.8 + 0.4):.3f}"
    fp_layer, fn_layer = viewer.layers["model output false positives"], viewer.layers["truth_anno false negatives"]
    assert np.unique(fp_layer.data).tolist() == [0, 301]  # the user's ids are kept
    assert np.array_equal(fn_layer.data, np.where(gt == 2, 2, 0))
    assert np.array_equal(viewer.layers["model output"].data, pred)  # inputs untouched
    assert w.prediction.value.name == "model output"  # error layers are not offered as inputs
    assert [layer.name for layer in w.ground_truth.choices if layer is not None] == ["truth_anno", "model output"]
    assert "F1 0.500" in w.status.value

    # Re-running replaces our own unedited error layers instead of piling up new ones.
    assert run_and_wait(qtbot, w) == "done"
    assert sum("false positives" in layer.name for layer in viewer.layers) == 1

    w.export(tmp_path / "m.json")
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["pooled"]["fp"] == 1 and data["images"]["image"]["object_f1"] == 0.5
    w.export(tmp_path / "m.csv")
    assert (tmp_path / "m.csv").read_text().splitlines()[1].startswith("image,0.5,")
    with pytest.raises(ValueError, match=".csv or .json"):
        w.export(tmp_path / "m.txt")


def test_stack_rows_per_plane_and_roc(widget, qtbot):
    viewer, w = widget
    pred, gt = squares()
    gt_stack = np.stack([gt, gt])
    pred_stack = np.stack([pred, gt])  # plane 1 is perfect
    prob = np.stack([(gt > 0) * 0.8 + 0.1] * 2).astype(np.float32)[:, ::2, ::2]  # half resolution
    viewer.add_labels(gt_stack, name="gt")
    viewer.add_labels(pred_stack, name="pred")
    viewer.add_image(prob, name="probability")
    w.ground_truth.value, w.prediction.value = viewer.layers["gt"], viewer.layers["pred"]
    w.probability.value = viewer.layers["probability"]
    assert run_and_wait(qtbot, w) == "done"
    assert list(w.table.value["columns"]) == ["pooled", "mean per plane", "plane 0", "plane 1"]
    assert table_column(w, 3)["Object F1"] == "1.000"
    # Pooled: TP 1 + 2, FP 1, FN 1 -> F1 = 6 / 8.
    assert table_column(w, 0)["Object F1"] == "0.750"
    assert 0.95 < float(table_column(w, 0)["ROC AUC"]) <= 1  # resampled: blurred only at the edges
    assert not w.canvas.isHidden() and w.figure.axes  # (the test viewer window itself is not shown)
    assert viewer.layers["pred false positives"].data.shape == gt_stack.shape


def test_bad_inputs_give_messages(widget, qtbot):
    viewer, w = widget
    w.run()
    assert "Choose a prediction" in w.status.value
    viewer.add_labels(np.zeros((10, 10), np.int32), name="a_gt")
    viewer.add_labels(np.zeros((10, 12), np.int32), name="b")
    w.ground_truth.value, w.prediction.value = viewer.layers["a_gt"], viewer.layers["b"]
    w.run()
    assert "differ in shape" in w.status.value
    viewer.add_labels(-np.ones((10, 10), np.int32), name="negative")
    w.prediction.value = viewer.layers["negative"]
    assert run_and_wait(qtbot, w) == "failed"
    assert "negative" in w.status.value


def test_cancel_changes_nothing(widget, qtbot):
    viewer, w = widget
    stack = np.zeros((300, 96, 96), np.int32)
    stack[:, 10:40, 10:40] = 1
    viewer.add_labels(stack, name="gt")
    viewer.add_labels(stack.copy(), name="pred")
    w.ground_truth.value, w.prediction.value = viewer.layers["gt"], viewer.layers["pred"]
    with qtbot.waitSignal(w.task.finished, timeout=60000) as blocker:
        w.run()
        w.task.cancel()
    assert blocker.args[0] == "cancelled"
    assert [layer.name for layer in viewer.layers] == ["gt", "pred"]
    assert w.report is None and w.run_button.enabled and "Cancelled" in w.status.value


def test_glas_sample_against_its_own_annotation(widget, qtbot):
    viewer, w = widget
    for data, meta, kind in glas_sample():
        getattr(viewer, f"add_{kind}")(data, **meta)
    labels = [layer for layer in viewer.layers if layer.__class__.__name__ == "Labels"]
    viewer.add_labels(labels[0].data.copy(), name="copy")
    w.ground_truth.value, w.prediction.value = labels[0], viewer.layers["copy"]
    assert run_and_wait(qtbot, w) == "done"
    rows = table_column(w)
    assert (rows["Object F1"], rows["Object Dice"], rows["Object Hausdorff (px)"]) == ("1.000", "1.000", "0.00")
    # A perfect match: no empty false-positive / false-negative layers.
    assert [layer.name for layer in viewer.layers] == ["glas_train_12", "glas_train_12 ground truth", "copy"]


def test_format_value():
    assert format_value("tp", 3) == "3" and format_value("tp", 1.5) == "1.50"
    assert format_value("object_hausdorff", float("inf")) == "inf"
    assert format_value("roc_auc", float("nan")) == "-"
    assert format_value("object_dice", 0.12345) == "0.123"
