"""Segment widget on a slide: a Shapes region segmented from disk, lazy labels over the slide."""

import numpy as np
import pytest
from conftest import run_and_wait

from glas_seg._slide_widget import SHAPES, SLIDE_SEGMENTATION, VISIBLE, WHOLE, slide_region
from glas_seg._widget_segment import SegmentWidget

pytestmark = pytest.mark.gui


def test_slide_region_in_a_shapes_layer_segments_from_disk(docked, qtbot, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # label stores go to the user cache
    viewer, widget = docked(SegmentWidget)
    [slide] = viewer.open(str(shared_data / "wsi" / "CMU-1-Small-Region.svs"), plugin="glas-seg")
    viewer.layers.selection.active = slide
    assert widget.image.value is slide and not widget.slide_region.native.isHidden()
    assert slide_region(viewer, slide, WHOLE) is None
    x, y, w, h = slide_region(viewer, slide, VISIBLE)
    assert w >= 16 and h >= 16 and x + w <= 2220 and y + h <= 2967
    # A rectangle drawn in micrometres over the slide: 700 x 600 base-level pixels at (1200, 800).
    mpp = 0.499
    viewer.add_shapes([np.array([[800, 1200], [1400, 1900]]) * mpp], shape_type="rectangle", name="region")
    viewer.layers.selection.active = slide
    assert slide_region(viewer, slide, SHAPES) == pytest.approx((1200, 800, 700, 600), abs=1)
    widget.slide_region.value = SHAPES
    assert run_and_wait(qtbot, widget) == "done"
    labels = viewer.layers["CMU-1-Small-Region.svs glands"]
    assert labels.metadata["glas_seg"]["role"] == SLIDE_SEGMENTATION
    assert labels.data.shape[-2:] == pytest.approx((600, 700), abs=1)  # world -> pixel rounding
    assert tuple(labels.translate) == pytest.approx((800 * mpp, 1200 * mpp), abs=mpp)
    assert tuple(labels.scale) == pytest.approx((mpp, mpp))
    base = labels.data[0] if labels.multiscale else labels.data
    assert np.asarray(base).max() >= 2
    assert "glands" in widget.status.value and "on disk" in widget.status.value


# -- editing a region of a slide's labels, and scoring it -------------------------------------------

def slide_with_labels(viewer, tmp_path, origin=(100, 50), mpp=2.0):
    """A synthetic slide layer (1500 x 1300 px at 2 um/px) and the lazy labels of a region of it
    (store_labels, 1300 x 1100 px at ``origin``), opened as the Segment widget opens them."""
    import types

    from test_slide_edit import make_label_store, store_labels

    from glas_seg._layers import METADATA_KEY
    from glas_seg._slide_widget import add_slide_labels

    rgb = np.full((1500, 1300, 3), 240, np.uint8)
    image = viewer.add_image([rgb, rgb[::2, ::2], rgb[::4, ::4]], rgb=True, multiscale=True, scale=(mpp, mpp),
                             name="slide.tif", metadata={"slide_path": str(tmp_path / "slide.tif"), "mpp": mpp})
    store = make_label_store(tmp_path / "slide_labels.zarr", store_labels(), origin=origin, mpp=mpp)
    result = types.SimpleNamespace(store=store, origin=origin, objects={})
    labels = add_slide_labels(viewer, image, result, "glands", "slide.tif glands", METADATA_KEY)
    return image, labels, store


def draw_box(viewer, labels, y0, y1, x0, x1):
    """A rectangle over store pixels ``[y0, y1) x [x0, x1)`` of the slide labels, drawn in world units."""
    corners = np.array([[y0, x0], [y1, x1]], float) * labels.scale + labels.translate
    return viewer.add_shapes([corners], shape_type="rectangle", name="region")


def test_edit_a_slide_region_and_write_it_back(docked, qtbot, tmp_path):
    import json

    from test_slide_edit import store_labels

    from glas_seg._slide_edit import SLIDE_REGION_EDIT
    from glas_seg._widget_edit import EditWidget
    from glas_seg.backend.slide_edit import read_labels_region, write_labels_region
    from glas_seg.backend.slide_segment import MANIFEST, open_labels

    viewer, edit = docked(EditWidget)
    assert edit.slide_row.native.isHidden()  # no slide yet: no slide row
    image, labels, store = slide_with_labels(viewer, tmp_path)
    assert not edit.slide_row.native.isHidden()
    before = open_labels(store)[0][:]
    next_id = json.loads((store / MANIFEST).read_text())["next_id"]
    draw_box(viewer, labels, 250, 420, 280, 400)  # square 2 is inside
    edit.slide_region.value = SHAPES
    region = edit.edit_region()
    meta = region.metadata["glas_seg"]
    assert meta["role"] == SLIDE_REGION_EDIT and meta["box"] == [250, 420, 280, 400]
    np.testing.assert_array_equal(region.data, store_labels()[250:420, 280:400])
    assert not region.multiscale and edit.labels.value is region  # the Edit tools work on it
    assert tuple(region.scale) == pytest.approx(tuple(labels.scale))
    assert tuple(region.translate) == pytest.approx(tuple(labels.translate + np.array([250, 280]) * labels.scale))
    assert tuple(labels.translate) == pytest.approx((200, 100))  # (origin) x 2 um

    # Edit with the widget's tools: delete square 2, paint a new object with the next free id
    # (3: free in the region, but square 3 lies elsewhere in the store).
    edit.select_next_free_id()
    assert region.selected_label == 3
    edit.selection.value = "2"
    edit.delete_selected()
    paint(region, 10, 30, 10, 40, 3)  # as napari's brush writes: one undoable history item
    shown = drawn(labels, 250, 420, 280, 400)  # read as napari draws it: through its dask cache
    np.testing.assert_array_equal(shown, before[250:420, 280:400])
    region.mode = "paint"
    edit.write_back()
    # The write runs in a worker thread: until it is done the region cannot be painted or edited.
    assert not region.editable and not edit.write_back_button.enabled
    edit.labels.value = region
    edit.undo()
    assert "being written back" in edit.status.value
    edit.selection.value = "1"
    edit.delete_selected()
    assert "being written back" in edit.status.value
    wait_for_write(qtbot, edit)
    assert region.editable and edit.write_back_button.enabled and region.mode == "paint"
    assert "Wrote" in edit.status.value and "refreshed" in edit.status.value, edit.status.value

    after = open_labels(store)[0][:]
    expected = np.zeros((170, 120), np.uint32)
    expected[10:30, 10:40] = next_id  # renumbered by the store
    np.testing.assert_array_equal(after[250:420, 280:400], expected)
    outside = np.ones(after.shape, bool)
    outside[250:420, 280:400] = False
    np.testing.assert_array_equal(after[outside], before[outside])
    np.testing.assert_array_equal(region.data, expected)  # the layer shows what the store holds
    np.testing.assert_array_equal(drawn(labels, 250, 420, 280, 400), expected)  # refreshed, not cached
    np.testing.assert_array_equal(np.asarray(labels.data[1]), after[::2, ::2])
    objects = json.loads((store / MANIFEST).read_text())["objects"]
    assert "2" not in objects and objects[str(next_id)]["area"] == 600 and objects["3"]["area"] == 50 * 80

    edit.write_back()
    wait_for_write(qtbot, edit)
    assert "nothing to write" in edit.status.value
    # Someone else writes into the region: this layer's edit is refused, theirs is kept.
    theirs = read_labels_region(store, (250, 420, 280, 400))
    theirs[100:120, 50:70] = 4
    write_labels_region(store, (250, 420, 280, 400), theirs)
    paint(region, 150, 160, 100, 110, 1)
    edit.write_back()
    wait_for_write(qtbot, edit)
    assert "changed on disk" in edit.status.value and "Nothing written" in edit.status.value
    assert region.editable
    np.testing.assert_array_equal(read_labels_region(store, (250, 420, 280, 400)), theirs)


def wait_for_write(qtbot, edit):
    qtbot.waitUntil(lambda: not edit.write_task.running and edit.write_back_button.enabled, timeout=30_000)


def drawn(layer, y0, y1, x0, x1):
    """Level 0 of a lazy layer read as napari reads it to draw (its opportunistic dask cache on)."""
    from napari.utils._dask_utils import configure_dask

    with configure_dask(layer.data)():
        return np.asarray(layer.data[0][y0:y1, x0:x1])


def paint(layer, y0, y1, x0, x1, value):
    rows, cols = np.mgrid[y0:y1, x0:x1]
    layer.data_setitem((rows.ravel(), cols.ravel()), value)


def test_edit_region_refuses_too_large_regions(docked, tmp_path, monkeypatch):
    from glas_seg import _slide_edit
    from glas_seg._widget_edit import EditWidget
    from glas_seg.backend import slide_edit

    viewer, edit = docked(EditWidget)
    edit.edit_region()
    assert "segment a slide first" in edit.status.value
    _, labels, _ = slide_with_labels(viewer, tmp_path)
    monkeypatch.setattr(slide_edit, "MAX_EDIT_PIXELS", 10_000)  # the default read limit is bound at import
    monkeypatch.setattr(_slide_edit, "read_labels_region",
                        lambda store, box: slide_edit.read_labels_region(store, box, max_pixels=10_000))
    draw_box(viewer, labels, 0, 200, 0, 200)
    edit.slide_region.value = SHAPES
    assert edit.edit_region() is None
    assert "zoom in or draw a smaller region" in edit.status.value
    assert [layer.name for layer in viewer.layers] == ["slide.tif", "slide.tif glands", "region"]


def test_metrics_on_a_slide_region(docked, qtbot, tmp_path):
    from test_slide_edit import store_labels

    from glas_seg._widget_edit import EditWidget
    from glas_seg._widget_metrics import MetricsWidget

    viewer, metrics = docked(MetricsWidget)
    edit = EditWidget(viewer)
    image, labels, store = slide_with_labels(viewer, tmp_path)
    # Ground truth over the whole slide (slide pixels): the store's objects at its origin, and one
    # more object in the region that the prediction misses.
    truth = np.zeros((1500, 1300), np.int32)
    truth[100:1400, 50:1150] = store_labels()
    truth[100 + 380 : 100 + 410, 50 + 290 : 50 + 320] = 50
    gt = viewer.add_labels(truth, name="annotation", scale=image.scale, translate=image.translate)
    draw_box(viewer, labels, 250, 420, 280, 400)

    def score(pred, choice=SHAPES):
        metrics.prediction.value, metrics.ground_truth.value = pred, gt
        metrics.slide_region.value = choice
        assert run_and_wait(qtbot, metrics) == "done", metrics.status.value
        return table_rows(metrics)

    # The slide's lazy labels, scored on the Shapes region: square 2 found, object 50 missed.
    rows = score(labels)
    assert not metrics.slide_region.native.isHidden()  # a choice for the slide's lazy labels
    assert (rows["True positives"], rows["False positives"], rows["False negatives"]) == ("1", "0", "1")
    assert rows["Object F1"] == "0.667"
    assert "120 x 170 px region" in metrics.status.value
    missed = viewer.layers["annotation false negatives"]
    assert missed.data.shape == (170, 120) and set(np.unique(missed.data)) == {0, 50}
    assert tuple(missed.translate) == pytest.approx(tuple(labels.translate + np.array([250, 280]) * 2.0))

    # The same region opened for editing scores the same.
    edit.slide_region.value = SHAPES
    region = edit.edit_region()
    rows = score(region)
    assert rows["Object F1"] == "0.667"

    # Layers that do not overlap: a clear message, no evaluation.
    elsewhere = viewer.add_labels(np.ones((50, 50), np.int32), name="elsewhere", scale=image.scale,
                                  translate=(10_000, 10_000))
    metrics.prediction.value, metrics.ground_truth.value = region, elsewhere
    metrics.run()
    assert "do not overlap" in metrics.status.value


def table_rows(w):
    value = w.table.value
    return dict(zip(value["index"], (row[0] for row in value["data"])))
