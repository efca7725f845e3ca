"""napari reader for whole-slide images: lazy multiscale layer, scale in micrometres."""

import numpy as np
import pytest
import tifffile

from glas_seg._reader import get_reader
from test_slide import write_pyramid

pytestmark = pytest.mark.gui


def test_reader_gives_lazy_levels_in_micrometres(tmp_path):
    import dask.array as da

    image = np.random.default_rng(1).integers(0, 256, (700, 1000, 3), dtype=np.uint8)
    path = write_pyramid(tmp_path / "slide.ome.tif", image, mpp=0.25, levels=3)
    tifffile.imwrite(tmp_path / "plain.tif", image)
    assert get_reader(str(tmp_path / "plain.tif")) is None  # napari's own reader takes it
    [(data, kwargs, kind)] = get_reader(str(path))(str(path))
    assert kind == "image" and kwargs["multiscale"] and kwargs["rgb"]
    assert kwargs["scale"] == (0.25, 0.25)
    assert all(isinstance(level, da.Array) for level in data)
    assert [level.shape for level in data] == [(700, 1000, 3), (350, 500, 3), (175, 250, 3)]
    np.testing.assert_array_equal(data[0][100:300, 600:900].compute(), image[100:300, 600:900])


def test_real_slide_opens_in_napari(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    path = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    [layer] = viewer.open(str(path), plugin="glas-seg")
    assert layer.rgb and tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert layer.data.shape[:2] == (2967, 2220)
    assert layer.metadata["mpp"] == pytest.approx(0.499)
    assert str(layer.units[0]) in ("micrometer", "um", "µm")
