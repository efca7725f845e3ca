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
