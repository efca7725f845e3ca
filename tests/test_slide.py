"""Whole-slide images: reading (OpenSlide and tifffile), model pixel sizes."""

import dataclasses

import numpy as np
import pytest
import tifffile

from glas_seg.backend.checkpoint import TASK_MPP, ModelConfig, model_mpp
from glas_seg.backend.errors import GlasSegError
from glas_seg.backend.model_schema import config_faults
from glas_seg.backend.slide import is_slide, open_slide, thumbnail


def write_pyramid(path, image, mpp=0.5, levels=3, ome=True, tile=128):
    """A tiled pyramidal (OME-)TIFF: the base level, then levels halved ``levels - 1`` times."""
    extra = {"metadata": {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp}} if ome and mpp else {}
    resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    with tifffile.TiffWriter(path, ome=ome) as tif:
        tif.write(image, subifds=levels - 1, tile=(tile, tile), compression="zlib", **resolution, **extra)
        for i in range(1, levels):
            tif.write(image[:: 2**i, :: 2**i], subfiletype=1, tile=(tile, tile), compression="zlib")
    return path


@pytest.fixture
def pyramid_file(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (600, 900, 3), dtype=np.uint8)
    return write_pyramid(tmp_path / "slide.ome.tif", image), image


def test_ome_tiff_levels_regions_and_pixel_size(pyramid_file):
    path, image = pyramid_file
    with open_slide(path) as slide:
        assert [lv.shape for lv in slide.levels] == [(600, 900), (300, 450), (150, 225)]
        assert [lv.downsample for lv in slide.levels] == [1.0, 2.0, 4.0]
        assert slide.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read_region(0, 10, 20, 30, 40), image[10:40, 20:60])
        np.testing.assert_array_equal(slide.read_region(1, 5, 7, 11, 13), image[::2, ::2][5:16, 7:20])
        # A window overhanging the slide is white outside it.
        edge = slide.read_region(2, 140, 220, 20, 20)
        np.testing.assert_array_equal(edge[:10, :5], image[::4, ::4][140:, 220:])
        assert (edge[10:] == 255).all() and (edge[:, 5:] == 255).all()
        assert slide.best_level(3.0) == 1 and slide.best_level(0.5) == 0 and slide.best_level(64) == 2


def test_plain_tiff_is_no_slide_but_pixel_size_from_resolution_tags(tmp_path):
    image = np.zeros((64, 80, 3), np.uint8)
    tifffile.imwrite(tmp_path / "plain.tif", image)
    assert not is_slide(tmp_path / "plain.tif")
    path = write_pyramid(tmp_path / "plain_pyramid.tif", image, mpp=0.25, levels=2, ome=False, tile=16)
    assert is_slide(path)
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25)
    with open_slide(write_pyramid(tmp_path / "unknown.tif", image, mpp=None, levels=2, ome=False, tile=16)) as slide:
        assert slide.mpp is None


def test_thumbnail_reads_the_coarsest_fitting_level(pyramid_file):
    path, image = pyramid_file
    with open_slide(path) as slide:
        small, downsample = thumbnail(slide, 8, block=64)
    assert downsample == 8.0 and small.shape == (75, 113, 3)
    expected = image[::4, ::4][:8, :8].reshape(4, 2, 4, 2, 3).mean((1, 3))
    np.testing.assert_allclose(small[:4, :4], expected, atol=0.51)


def test_missing_or_unreadable_slide_is_one_user_error(tmp_path):
    with pytest.raises(GlasSegError, match="does not exist"):
        open_slide(tmp_path / "nothing.svs")
    (tmp_path / "bad.svs").write_bytes(b"not a slide")
    with pytest.raises(GlasSegError):
        open_slide(tmp_path / "bad.svs")


def test_real_aperio_slide(shared_data):
    path = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    assert is_slide(path)
    with open_slide(path) as slide:
        assert slide.shape == (2967, 2220)
        assert slide.mpp == pytest.approx(0.499)
        assert "label" in slide.associated_names
        label = slide.associated_image("label")
        assert label.dtype == np.uint8 and label.ndim == 3 and label.shape[2] == 3
        region = slide.read_region(0, 1000, 1000, 64, 96)
        assert region.shape == (64, 96, 3) and region.dtype == np.uint8
        assert region.std() > 5  # tissue, not a blank fill


def test_model_pixel_size_field_and_fallback():
    config = ModelConfig("m", "unet")
    assert config.mpp is None and model_mpp(config) == TASK_MPP["glands"] == 0.62
    assert model_mpp(dataclasses.replace(config, task="nuclei")) == 0.25
    assert model_mpp(dataclasses.replace(config, mpp=0.5)) == 0.5
    stored = dataclasses.asdict(config)
    assert config_faults({**stored, "mpp": 0.5}) == []
    assert config_faults({**stored, "mpp": None}) == []
    assert config_faults({**stored, "mpp": 500}) == ["mpp 500 is out of range [0.05, 20.0]"]
    assert config_faults({**stored, "mpp": "0.5"}) == ["mpp must be a number or null, not str"]
    assert ModelConfig.from_json(dataclasses.replace(config, mpp=0.3).to_json()).mpp == 0.3
