"""Edit labels widget wired to a napari viewer (run under Xvfb)."""

import numpy as np
import pytest

from glas_seg import _widget_edit
from glas_seg._widget_edit import KEY_BINDINGS, EditWidget, apply_plane_edit, parse_ids

pytestmark = pytest.mark.gui

HUGE = 4_000_000_000


@pytest.fixture
def warnings(monkeypatch):
    messages = []
    monkeypatch.setattr(_widget_edit, "show_warning", messages.append)
    return messages


@pytest.fixture
def setup(make_napari_viewer, touching_squares, warnings):
    viewer = make_napari_viewer()
    layer = viewer.add_labels(touching_squares.copy(), name="glands")
    widget = EditWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return viewer, layer, widget


def press(viewer, key: str) -> None:
    """Send a key through the viewer's key map, as the canvas does."""
    assert viewer.window._qt_viewer._key_map_handler.press_key(key)


def test_widget_follows_labels_and_shows_the_keys(setup):
    viewer, layer, widget = setup
    assert widget.labels.value is layer
    for key, text, _ in KEY_BINDINGS:
        assert f"{key}: {text}" in widget.keys.value
    other = viewer.add_labels(np.zeros((4, 4), np.int32), name="other")
    assert widget.labels.value is other
    viewer.layers.selection.active = layer
    assert widget.labels.value is layer
    widget.unbind_keys()
    assert not viewer.window._qt_viewer._key_map_handler.press_key("Shift-D")


def test_plugin_manifest_opens_the_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("glas-seg", "Edit labels")
    assert isinstance(widget, EditWidget)


def test_delete_under_cursor_by_key_then_undo(setup):
    viewer, layer, widget = setup
    before = layer.data.copy()
    viewer.cursor.position = (10, 30)  # inside object 2
    press(viewer, "Shift-D")
    expected = before.copy()
    expected[expected == 2] = 0
    np.testing.assert_array_equal(layer.data, expected)
    assert len(layer._undo_history) == 1  # one history item
    layer.undo()
    np.testing.assert_array_equal(layer.data, before)
    layer.redo()
    np.testing.assert_array_equal(layer.data, expected)


def test_cursor_on_background_warns_and_changes_nothing(setup, warnings):
    viewer, layer, widget = setup
    before = layer.data.copy()
    viewer.cursor.position = (1, 1)
    press(viewer, "Shift-D")
    viewer.cursor.position = (-5, 300)  # outside the layer
    widget.delete_under_cursor()
    np.testing.assert_array_equal(layer.data, before)
    assert warnings == ["glas-seg: no object under the cursor"] * 2
    assert len(layer._undo_history) == 0


def test_select_then_merge_by_keys(setup):
    viewer, layer, widget = setup
    before = layer.data.copy()
    viewer.cursor.position = (45, 45)
    press(viewer, "Shift-S")
    assert widget.selection.value == "5"
    viewer.cursor.position = (10, 10)
    press(viewer, "Shift-M")
    expected = before.copy()
    expected[expected == 1] = 5
    np.testing.assert_array_equal(layer.data, expected)
    assert widget.selection.value == ""
    widget.undo()
    np.testing.assert_array_equal(layer.data, before)
    widget.selection.value = "1, 5"
    widget.toggle_under_cursor()  # the cursor is still over 1: Shift-S removes it
    assert widget.selection.value == "5"


def test_delete_and_merge_selected_buttons(setup, warnings):
    _, layer, widget = setup
    before = layer.data.copy()
    widget.selection.value = "2, 1"
    widget.merge_button.clicked.emit()
    expected = before.copy()
    expected[expected == 1] = 2
    np.testing.assert_array_equal(layer.data, expected)
    widget.selection.value = "2 5"
    widget.delete_button.clicked.emit()
    np.testing.assert_array_equal(layer.data, np.zeros_like(before))
    assert len(layer._undo_history) == 2
    widget.selection.value = "oops"
    widget.delete_selected()
    assert warnings[-1].startswith("glas-seg: Selected ids must be positive whole numbers")
    widget.undo()
    widget.undo()
    np.testing.assert_array_equal(layer.data, before)


def test_split_along_a_shapes_line_leaves_the_shapes_alone(setup):
    viewer, layer, widget = setup
    fused = layer.data.copy()
    fused[fused == 2] = 1
    layer.data = fused
    shapes = viewer.add_shapes([np.array([[0, 25.2], [30, 24.8]])], shape_type="path", name="cut")
    shapes_before = [d.copy() for d in shapes.data]
    assert widget.cut_lines.value is shapes
    viewer.layers.selection.active = layer
    press(viewer, "Shift-K")
    expected = fused.copy()
    expected[5:25, 26:45] = 6  # the smaller right half gets the next free id (5 + 1)
    np.testing.assert_array_equal(layer.data, expected)
    assert len(shapes.data) == 1 and np.array_equal(shapes.data[0], shapes_before[0])
    layer.undo()
    np.testing.assert_array_equal(layer.data, fused)


def test_split_by_seed_points(setup):
    viewer, layer, widget = setup
    fused = layer.data.copy()
    fused[fused == 2] = 1
    layer.data = fused
    points = viewer.add_points([[14, 14], [14, 35], [50, 50]], name="seeds")  # one in object 5
    points_before = points.data.copy()
    widget.split_seeds_button.clicked.emit()
    out = layer.data
    assert set(np.unique(out)) == {0, 1, 5, 6}
    assert (out[5:25, 5:25] == 1).all() and (out[5:25, 26:45] == 6).all()
    assert ((out == 1) | (out == 6)).sum() == 800
    np.testing.assert_array_equal(points.data, points_before)
    widget.undo()
    np.testing.assert_array_equal(layer.data, fused)


def test_split_without_line_or_seeds_warns(setup, warnings):
    _, layer, widget = setup
    before = layer.data.copy()
    widget.split_along_line()
    widget.split_by_seeds()
    assert len(warnings) == 2 and "Shapes layer" in warnings[0] and "Points layer" in warnings[1]
    np.testing.assert_array_equal(layer.data, before)


def test_new_helper_layers(setup):
    viewer, layer, widget = setup
    widget.new_cut_layer.clicked.emit()
    widget.new_seed_layer.clicked.emit()
    assert widget.cut_lines.value is viewer.layers["cut lines"] and viewer.layers["cut lines"].mode == "add_path"
    assert widget.seeds.value is viewer.layers["seeds"] and viewer.layers["seeds"].mode == "add"
    assert widget.labels.value is layer


def test_fill_remove_smooth_relabel_each_one_undo_step(setup):
    viewer, layer, widget = setup
    data = layer.data.copy()
    data[10, 10] = 0  # a hole in 1
    data[30:32, 2:4] = 7  # 4 px of debris
    layer.data = data
    widget.fill_button.clicked.emit()
    step1 = data.copy()
    step1[10, 10] = 1
    np.testing.assert_array_equal(layer.data, step1)
    widget.min_size.value = 5
    widget.remove_button.clicked.emit()
    step2 = step1.copy()
    step2[step2 == 7] = 0
    np.testing.assert_array_equal(layer.data, step2)
    widget.radius.value = 1
    widget.selection.value = "5"
    widget.smooth_button.clicked.emit()
    step3 = step2.copy()
    step3[[40, 40, 59, 59], [40, 59, 40, 59]] = 0  # the square's corners
    np.testing.assert_array_equal(layer.data, step3)
    widget.relabel_button.clicked.emit()
    step4 = step3.copy()
    step4[step4 == 5] = 3
    np.testing.assert_array_equal(layer.data, step4)
    for previous in (step3, step2, step1, data):
        widget.undo()
        np.testing.assert_array_equal(layer.data, previous)


def test_keys_for_holes_smoothing_and_next_id(setup):
    viewer, layer, widget = setup
    data = layer.data.copy()
    data[10, 10] = 0
    layer.data = data
    viewer.cursor.position = (6, 6)
    press(viewer, "Shift-H")
    assert layer.data[10, 10] == 1
    widget.radius.value = 1
    press(viewer, "Shift-O")
    expected = data.copy()
    expected[10, 10] = 1
    # A radius-1 opening rounds all four corners of square 1, also those against object 2
    # (object 2 is never changed, and closing never takes its pixels).
    expected[[5, 5, 24, 24], [5, 24, 5, 24]] = 0
    np.testing.assert_array_equal(layer.data, expected)
    press(viewer, "Shift-N")
    assert layer.selected_label == 6


def test_stack_edits_only_the_current_plane(make_napari_viewer, warnings):
    viewer = make_napari_viewer()
    stack = np.zeros((3, 10, 10), np.int64)
    stack[:, 2:8, 2:8] = HUGE
    stack[:, 2:8, 5] = 0
    stack[:, 2:8, 6:8] = 70_000
    layer = viewer.add_labels(stack.copy(), name="stack")
    widget = EditWidget(viewer)
    viewer.dims.set_current_step(0, 1)
    widget.selection.value = f"{HUGE}, 70000"
    widget.merge_selected()
    expected = stack.copy()
    expected[1][expected[1] == 70_000] = HUGE
    np.testing.assert_array_equal(layer.data, expected)
    viewer.cursor.position = (1, 3, 3)
    widget.delete_under_cursor()
    expected[1] = 0
    np.testing.assert_array_equal(layer.data, expected)
    widget.undo()
    widget.undo()
    np.testing.assert_array_equal(layer.data, stack)
    assert layer.data.dtype == np.int64 and not warnings


def test_stack_split_uses_ids_free_in_every_plane(make_napari_viewer):
    viewer = make_napari_viewer()
    stack = np.zeros((2, 10, 10), np.uint32)
    stack[0, 2:8, 2:8] = 9
    stack[1, 1:3, 1:3] = HUGE  # another plane holds the largest id
    layer = viewer.add_labels(stack.copy(), name="stack")
    widget = EditWidget(viewer)
    viewer.add_points([[0, 4, 3], [0, 4, 7], [1, 2, 2]], name="seeds")
    viewer.dims.set_current_step(0, 0)
    widget.split_by_seeds()
    plane = layer.data[0]
    assert set(np.unique(plane)) == {0, 9, HUGE + 1}
    np.testing.assert_array_equal(layer.data[1], stack[1])


def test_3d_view_is_refused(make_napari_viewer, warnings):
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.full((2, 5, 5), 3, np.int32))
    widget = EditWidget(viewer)
    viewer.dims.ndisplay = 3
    widget.relabel()
    assert warnings == ["glas-seg: edit in the 2D view of the last two axes (rows, columns)"]
    np.testing.assert_array_equal(layer.data, np.full((2, 5, 5), 3, np.int32))


def test_no_labels_layer_warns(make_napari_viewer, warnings):
    viewer = make_napari_viewer()
    widget = EditWidget(viewer)
    widget.fill_holes()
    widget.undo()
    widget.select_next_free_id()
    assert len(warnings) == 3 and warnings[0].startswith("glas-seg: choose a Labels layer")


def test_apply_plane_edit_writes_one_history_item_only_when_changed():
    from napari.layers import Labels

    data = np.zeros((2, 4, 4), np.uint32)
    layer = Labels(data.copy())
    new = np.zeros((4, 4), np.uint32)
    assert apply_plane_edit(layer, (1,), new) == 0 and len(layer._undo_history) == 0
    new[1, 2] = HUGE
    assert apply_plane_edit(layer, (1,), new) == 1
    assert layer.data[1, 1, 2] == HUGE and layer.data.sum() == HUGE and len(layer._undo_history) == 1
    layer.undo()
    np.testing.assert_array_equal(layer.data, data)


def test_parse_ids():
    assert parse_ids(" 12, 40 7;12 ") == [12, 40, 7]
    assert parse_ids("") == []
    with pytest.raises(ValueError, match="'-3'"):
        parse_ids("1, -3")


def test_keys_do_not_clash_with_napari_defaults():
    from napari.components import ViewerModel
    from napari.layers import Labels, Points, Shapes
    from napari.utils.key_bindings import coerce_keybinding
    from napari.utils.shortcuts import default_shortcuts

    taken = {binding for bindings in default_shortcuts.values() for binding in bindings}
    for cls in (ViewerModel, Labels, Points, Shapes):
        taken |= set(cls.class_keymap)
    ours = {coerce_keybinding(key) for key, _, _ in KEY_BINDINGS}
    assert len(ours) == len(KEY_BINDINGS)
    assert coerce_keybinding("Shift-V") in taken  # the check sees napari's Shift bindings
    assert not ours & taken
