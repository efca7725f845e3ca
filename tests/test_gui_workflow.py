"""The widgets together, as a new user meets them (issue 14): no silent wrong input, one tab group.

Each ``test_trap_*`` reproduces one trap of issue 14, point 1, and failed before the fix.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_and_wait
from qtpy.QtWidgets import QApplication
from test_metrics_widget import squares  # ground truth: two squares; prediction: 1 TP, 1 FP, 1 FN

from glas_seg._dock import glas_seg_docks
from glas_seg._layers import FALSE_NEGATIVES, PROBABILITY, role
from glas_seg._sample_data import glas_sample
from glas_seg._widget_edit import EditWidget
from glas_seg._widget_finetune import FinetuneWidget
from glas_seg._widget_metrics import MetricsWidget
from glas_seg._widget_segment import SegmentWidget

pytestmark = pytest.mark.gui

MENU_ORDER = ["Segment", "Edit labels", "Fine-tune", "Metrics"]


def open_all(viewer) -> dict:
    """Open the four widgets as the Plugins menu does, in menu order; wait until they are docked."""
    widgets = {name: viewer.window.add_plugin_dock_widget("glas-seg", name)[1] for name in MENU_ORDER}
    for _ in range(5):
        QApplication.processEvents()
    return widgets


# -- point 1: silent wrong input ---------------------------------------------------------------------
def test_trap_segment_image_box_does_not_follow_the_new_probability_layer(make_napari_viewer, qtbot):
    """Was: the new probability layer became active, the Image box followed it, and the next click
    segmented the probability map."""
    viewer = make_napari_viewer()
    viewer.open_sample("glas-seg", "glas")
    image = viewer.layers["glas_train_12"]
    viewer.layers.selection.active = image
    segment = open_all(viewer)["Segment"]
    segment.probabilities.value = True
    assert segment.image.value is image
    assert run_and_wait(qtbot, segment) == "done"
    probability = viewer.layers["glas_train_12 gland probability"]
    assert segment.image.value is image
    assert role(probability) == PROBABILITY
    assert viewer.layers.selection.active is image  # the user's selection is left alone
    assert probability not in segment.image.choices  # and never offered as an image to segment
    viewer.layers.selection.active = probability  # even when the user selects it
    assert segment.image.value is image
    assert run_and_wait(qtbot, segment) == "done"
    assert segment.status.value.startswith("glas_train_12 glands")
    assert "probability glands" not in " ".join(layer.name for layer in viewer.layers)


def test_trap_edit_labels_box_does_not_follow_metrics_error_layers(make_napari_viewer, qtbot):
    """Was: after Metrics, Edit's Labels box followed the active "... false negatives" layer, so
    Shift-D edited that layer."""
    viewer = make_napari_viewer()
    pred, gt = squares()
    truth = viewer.add_labels(gt, name="truth_anno")
    prediction = viewer.add_labels(pred, name="model output")
    widgets = open_all(viewer)
    edit, metrics = widgets["Edit labels"], widgets["Metrics"]
    viewer.layers.selection.active = prediction
    assert edit.labels.value is prediction
    assert (metrics.prediction.value, metrics.ground_truth.value) == (prediction, truth)
    assert run_and_wait(qtbot, metrics) == "done"
    missed = viewer.layers["truth_anno false negatives"]
    false_pos = viewer.layers["model output false positives"]
    assert edit.labels.value is prediction and viewer.layers.selection.active is prediction
    assert role(missed) == FALSE_NEGATIVES
    assert missed not in edit.labels.choices and false_pos not in edit.labels.choices
    viewer.layers.selection.active = missed  # looking at the errors does not retarget Edit either
    assert edit.labels.value is prediction
    viewer.cursor.position = (32, 32)  # the false-positive blob, id 301
    assert viewer.window._qt_viewer._key_map_handler.press_key("Shift-D")
    assert 301 not in prediction.data and np.array_equal(missed.data, np.where(gt == 2, 2, 0))


def test_trap_widgets_do_not_retarget_to_a_new_segmentation(make_napari_viewer, qtbot):
    """A new result layer does not take over the Edit widget's Labels box (nor the selection);
    selecting it does."""
    viewer = make_napari_viewer()
    viewer.open_sample("glas-seg", "glas")
    truth = viewer.layers["glas_train_12 ground truth"]
    truth.visible = True
    widgets = open_all(viewer)
    segment, edit = widgets["Segment"], widgets["Edit labels"]
    viewer.layers.selection.active = truth
    assert edit.labels.value is truth and segment.image.value is viewer.layers["glas_train_12"]
    assert run_and_wait(qtbot, segment) == "done"
    result = viewer.layers["glas_train_12 glands"]
    assert edit.labels.value is truth and viewer.layers.selection.active is truth
    viewer.layers.selection.active = result
    assert edit.labels.value is result


def test_empty_boxes_take_the_new_result(make_napari_viewer, qtbot):
    """With no labels before, Edit and Metrics fill their empty boxes with the new segmentation."""
    viewer = make_napari_viewer()
    image = viewer.add_image(glas_sample()[0][0], name="he", rgb=True)
    widgets = open_all(viewer)
    assert widgets["Edit labels"].labels.value is None
    assert run_and_wait(qtbot, widgets["Segment"]) == "done"
    result = viewer.layers["he glands"]
    assert widgets["Edit labels"].labels.value is result and widgets["Metrics"].prediction.value is result
    assert widgets["Metrics"].ground_truth.value is None  # a result is never guessed to be the truth
    assert viewer.layers.selection.active is image


def test_finetune_and_metrics_offer_only_fitting_layers(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample("glas-seg", "glas")
    widgets = open_all(viewer)
    segment, metrics, finetune = widgets["Segment"], widgets["Metrics"], widgets["Fine-tune"]
    segment.probabilities.value = True
    assert run_and_wait(qtbot, segment) == "done"
    pred, gt = squares()
    metrics.ground_truth.value = viewer.add_labels(gt, name="gt")
    metrics.prediction.value = viewer.add_labels(pred, name="pred")
    assert run_and_wait(qtbot, metrics) == "done"
    probability = viewer.layers["glas_train_12 gland probability"]
    errors = [layer for layer in viewer.layers if "false" in layer.name]
    assert errors
    row = finetune.pair_rows[0]
    assert probability not in row.image_layer.choices
    assert not set(errors) & set(row.labels_layer.choices)
    assert not set(errors) & (set(metrics.prediction.choices) | set(metrics.ground_truth.choices))
    assert probability in metrics.probability.choices  # where a probability map fits, it is offered


def test_edit_refuses_a_hidden_layer(make_napari_viewer):
    """The sample's ground truth opens hidden: a key press must not change what nobody sees."""
    viewer = make_napari_viewer()
    viewer.open_sample("glas-seg", "glas")
    edit = open_all(viewer)["Edit labels"]
    truth = viewer.layers["glas_train_12 ground truth"]
    assert edit.labels.value is truth and not truth.visible
    before = truth.data.copy()
    viewer.cursor.position = (200, 300)
    edit.delete_under_cursor()
    assert np.array_equal(truth.data, before) and "hidden" in edit.status.value


# -- point 2: dock layout ------------------------------------------------------------------------------
def test_plugin_menu_is_in_workflow_order():
    from npe2 import PluginManifest

    from glas_seg import _widget_segment

    manifest = PluginManifest.from_file(_widget_segment.__file__.replace("_widget_segment.py", "napari.yaml"))
    assert [w.display_name for w in manifest.contributions.widgets] == MENU_ORDER


def test_widgets_open_as_tabs_and_fit_a_1000_px_screen(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("glas-seg", "glas")
    widgets = open_all(viewer)
    window = viewer.window._qt_window
    docks = glas_seg_docks(window)
    assert len(docks) == 4
    assert set(window.tabifiedDockWidgets(docks[0])) == set(docks[1:])  # one tab group
    # Was 2112 px with the four docks stacked. Each widget's controls fit in a tab on a 1000 px screen.
    assert window.minimumSizeHint().height() <= 1000
    for widget in widgets.values():
        assert widget.native.minimumSizeHint().height() <= 850, type(widget).__name__


def test_long_status_text_wraps_instead_of_widening_the_dock(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    widgets = open_all(viewer)
    long = "glas-seg: " + "a rather long message about what happened " * 12
    for widget in widgets.values():
        widget.native.parentWidget().raise_()
        before = widget.native.sizeHint().width()
        widget.status.value = long
        for _ in range(5):
            QApplication.processEvents()
        label = widget.status.native
        assert widget.native.sizeHint().width() <= before + 10, type(widget).__name__  # was ~3800 px
        assert label.height() >= label.heightForWidth(label.width()) > 3 * label.fontMetrics().height()


def test_edit_status_line_sits_above_the_key_list(make_napari_viewer):
    viewer = make_napari_viewer()
    edit = EditWidget(viewer)
    order = list(edit)
    assert order.index(edit.status) < order.index(edit.keys)


# -- point 5: small things -------------------------------------------------------------------------
def test_plots_follow_the_napari_theme(make_napari_viewer, qtbot):
    from matplotlib.colors import to_hex
    from napari.utils.theme import get_theme

    viewer = make_napari_viewer()
    widgets = open_all(viewer)
    metrics, finetune = widgets["Metrics"], widgets["Fine-tune"]
    pred, gt = squares()
    viewer.add_labels(gt, name="gt")
    viewer.add_labels(pred, name="pred")
    viewer.add_image(((gt > 0) * 0.8 + 0.1).astype(np.float32), name="probability")
    metrics.ground_truth.value, metrics.prediction.value = viewer.layers["gt"], viewer.layers["pred"]
    metrics.probability.value = viewer.layers["probability"]
    assert run_and_wait(qtbot, metrics) == "done"
    for theme in (viewer.theme, "light"):
        viewer.theme = theme
        background = get_theme(theme).background.as_hex()
        for figure in (metrics.figure, finetune.figure):
            assert to_hex(figure.get_facecolor()) == background
            assert to_hex(figure.axes[0].get_facecolor()) == background
    assert get_theme("dark").background.as_hex() != "#ffffff"


def test_segment_status_follows_edits_of_the_result(make_napari_viewer, qtbot):
    """Was: "16 glands" stayed after glands were deleted."""
    viewer = make_napari_viewer()
    viewer.open_sample("glas-seg", "glas")
    widgets = open_all(viewer)
    segment, edit = widgets["Segment"], widgets["Edit labels"]
    assert run_and_wait(qtbot, segment) == "done"
    result = viewer.layers["glas_train_12 glands"]
    count = len(np.unique(result.data)) - 1
    assert segment.status.value == f"glas_train_12 glands: {count} glands"
    viewer.layers.selection.active = result
    edit.selection.value = ", ".join(str(i) for i in np.unique(result.data)[1:3])
    edit.delete_selected()
    qtbot.waitUntil(lambda: f": {count - 2} glands" in segment.status.value, timeout=5000)
    assert f"({count} when segmented)" in segment.status.value
    result.undo()
    qtbot.waitUntil(lambda: segment.status.value == f"glas_train_12 glands: {count} glands", timeout=5000)
    viewer.layers.remove(result)
    assert "removed" in segment.status.value
    # A closed Segment dock does not break edits of its last result.
    assert run_and_wait(qtbot, segment) == "done"
    result = viewer.layers["glas_train_12 glands"]
    viewer.window.remove_dock_widget(segment.native.parentWidget())
    QApplication.processEvents()
    result.data = np.zeros_like(result.data)
    qtbot.wait(300)


def test_metrics_value_column_is_wide_enough(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    metrics = open_all(viewer)["Metrics"]
    pred, gt = squares()
    viewer.add_labels(gt, name="gt")
    viewer.add_labels(pred, name="pred")
    metrics.ground_truth.value, metrics.prediction.value = viewer.layers["gt"], viewer.layers["pred"]
    assert run_and_wait(qtbot, metrics) == "done"
    from qtpy.QtCore import QLocale

    table = metrics.table.native
    shown = table.itemDelegate().displayText
    assert shown(table.item(0, 0).text(), QLocale()) == "0.500"  # as formatted: was "0.5000"
    for column in range(table.columnCount()):
        texts = [shown(table.item(row, column).text(), QLocale()) for row in range(table.rowCount())]
        widest = max(table.fontMetrics().horizontalAdvance(text) for text in texts)
        assert table.columnWidth(column) >= widest + 6
    assert table.verticalScrollBar().maximum() == 0  # every row visible


def test_metrics_adds_no_empty_error_layers_and_removes_stale_ones(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    metrics = open_all(viewer)["Metrics"]
    pred, gt = squares()
    viewer.add_labels(gt, name="gt")
    prediction = viewer.add_labels(pred, name="pred")
    metrics.ground_truth.value, metrics.prediction.value = viewer.layers["gt"], prediction
    assert run_and_wait(qtbot, metrics) == "done"
    assert "pred false positives" in viewer.layers and "gt false negatives" in viewer.layers
    prediction.data = gt.copy()  # now perfect: the old error layers would be stale
    assert run_and_wait(qtbot, metrics) == "done"
    assert [layer.name for layer in viewer.layers] == ["gt", "pred"]


def test_sample_opens_image_and_ground_truth_ready_for_metrics(make_napari_viewer, qtbot):
    """File > Open Sample > glas-seg, Segment, Evaluate: no other step."""
    from glas_seg._sample_data import SAMPLE_DIR

    viewer = make_napari_viewer()
    viewer.open_sample("glas-seg", "glas")
    assert [layer.name for layer in viewer.layers] == ["glas_train_12", "glas_train_12 ground truth"]
    truth = viewer.layers["glas_train_12 ground truth"]
    assert truth.data.shape == viewer.layers["glas_train_12"].data.shape[:2]
    assert len(np.unique(truth.data)) - 1 == 16  # GlaS train_12: 16 annotated glands
    assert sum(f.stat().st_size for f in SAMPLE_DIR.glob("*anno*")) < 50_000  # a small copy
    widgets = open_all(viewer)
    segment, metrics = widgets["Segment"], widgets["Metrics"]
    assert metrics.ground_truth.value is truth
    assert run_and_wait(qtbot, segment) == "done"
    assert metrics.prediction.value is viewer.layers["glas_train_12 glands"]
    assert run_and_wait(qtbot, metrics) == "done"
    assert float(metrics.table.value["data"][0][0]) > 0.5  # object F1 of the default model


def test_widget_classes_are_what_the_menu_opens(make_napari_viewer):
    viewer = make_napari_viewer()
    widgets = open_all(viewer)
    assert [type(w) for w in widgets.values()] == [SegmentWidget, EditWidget, FinetuneWidget, MetricsWidget]
