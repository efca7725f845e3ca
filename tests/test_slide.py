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


# -- segmenting a slide: chunks, merging across borders, resuming (a fake segment() stands in for
# the network, so that the bookkeeping is tested exactly and fast) -------------------------------

import csv  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402

from scipy import ndimage as ndi  # noqa: E402

from glas_seg.backend import inference, slide_segment  # noqa: E402
from glas_seg.backend.progress import Cancelled  # noqa: E402
from glas_seg.backend.slide_export import export_objects, write_labels_tiff  # noqa: E402
from glas_seg.backend.slide_segment import open_labels, segment_slide  # noqa: E402


def shapes_slide(height=900, width=1100):
    """White glass with dark objects: bars longer than a chunk, disks, a blob on a chunk corner
    (at 2 um/px, as large as glands)."""
    truth = np.zeros((height, width), np.int32)
    truth[100:140, 50:1000] = 1                       # crosses every chunk column
    truth[200:800, 300:330] = 2                       # crosses every chunk row
    yy, xx = np.mgrid[:height, :width]
    truth[(yy - 512) ** 2 + (xx - 512) ** 2 < 60**2] = 3  # centred on a chunk corner (chunk 256)
    truth[(yy - 700) ** 2 + (xx - 800) ** 2 < 30**2] = 4
    truth[600:700, 950:1060] = 5
    image = np.full((height, width, 3), 250, np.uint8)
    image[truth > 0] = (90, 40, 120)
    return image, truth


@pytest.fixture
def fake_segment(monkeypatch):
    """segment() that labels dark pixels (4-connected) and records the images it was given."""
    calls = []

    def segment(model, image, min_size=None, mask_glass=True, cancel=None, **kwargs):
        calls.append(image.shape)
        labels = ndi.label(image.mean(-1) < 160)[0].astype(np.int32)
        foreground = (labels > 0).astype(np.float32) * 0.9
        return inference.Segmentation(labels, np.stack([1 - foreground, foreground, 0 * foreground]))

    monkeypatch.setattr(inference, "segment", segment)
    # Windows exactly as tissue_windows cut them (no growth to WINDOW_STEP): these tests check
    # which pixels the network is shown; test_windows_are_read_in_few_shapes checks the growth.
    monkeypatch.setattr(slide_segment, "WINDOW_STEP", 1)
    return calls


def fake_model(mpp=2.0):
    return types.SimpleNamespace(config=ModelConfig("fake", "unet", mpp=mpp, min_size=10))


def assert_one_id_per_object(labels, truth):
    assert (labels > 0).sum() == (truth > 0).sum()
    for index in range(1, truth.max() + 1):
        ids = np.unique(labels[truth == index])
        assert len(ids) == 1 and ids[0] > 0, f"object {index} got ids {ids}"
    assert len(np.unique(labels[labels > 0])) == truth.max()


def test_objects_crossing_chunk_borders_keep_one_id(tmp_path, fake_segment):
    image, truth = shapes_slide(height=1400)  # rows below 1024 are blank glass
    path = write_pyramid(tmp_path / "shapes.tif", image, mpp=2.0, levels=2)
    result = segment_slide(fake_model(), path, tmp_path / "out.zarr", chunk_size=256, halo=32)
    labels = open_labels(result.store)
    assert_one_id_per_object(labels[0][:], truth)
    assert sorted(result.objects) == list(range(1, 6))
    assert result.objects[3]["area"] == (truth == 3).sum()
    assert result.objects[1]["box"] == [100, 50, 140, 1000]
    # Glass-only chunks are never read: 6 x 5 chunks on the grid, the two blank rows skipped;
    # inside a chunk only windows around its pieces of tissue are segmented.
    assert result.chunks == 30 and result.chunks_with_tissue <= 20
    assert sum(h * w for h, w, _ in fake_segment) < result.chunks_with_tissue * 320**2 / 2
    # Display pyramid: halves (nearest id) down to 512 px or less.
    assert [a.shape for a in labels] == [(1400, 1100), (700, 550), (350, 275)]
    np.testing.assert_array_equal(labels[1][:], labels[0][::2, ::2])


def test_slide_resampled_to_the_model_pixel_size(tmp_path, fake_segment):
    image, truth = shapes_slide()
    path = write_pyramid(tmp_path / "shapes40x.tif", image, mpp=1.0, levels=1)
    result = segment_slide(fake_model(mpp=2.0), path, tmp_path / "out.zarr", chunk_size=256, halo=32)
    # Chunks of 256 + 2 x 32 model pixels cover twice as many slide pixels, read at half size.
    assert max(max(s[:2]) for s in fake_segment) <= 320 and result.mpp == 1.0
    labels = open_labels(result.store)[0][:]
    for index in range(1, 6):  # nearest-neighbour upsampling moves outlines by at most a pixel
        ids, counts = np.unique(labels[truth == index], return_counts=True)
        assert ids[np.argmax(counts)] > 0 and counts.max() > 0.95 * (truth == index).sum()
    assert len(result.objects) == 5


def test_unknown_pixel_size_warns_and_assumes_the_models(tmp_path, fake_segment):
    image, _ = shapes_slide(300, 300)
    path = write_pyramid(tmp_path / "nompp.tif", image, mpp=None, levels=1, ome=False)
    with pytest.warns(UserWarning, match="does not record its pixel size"):
        result = segment_slide(fake_model(0.5), path, tmp_path / "a.zarr", chunk_size=256, halo=32)
    assert result.mpp == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert segment_slide(fake_model(0.5), path, tmp_path / "b.zarr", mpp=0.25, chunk_size=256).mpp == 0.25


def test_blank_slide_reads_no_chunk(tmp_path, fake_segment):
    path = write_pyramid(tmp_path / "blank.tif", np.full((2000, 3000, 3), 245, np.uint8), mpp=0.5, levels=3)
    result = segment_slide(fake_model(), path, tmp_path / "out.zarr", chunk_size=256)
    assert result.chunks_with_tissue == 0 and fake_segment == [] and result.objects == {}
    assert open_labels(result.store)[0][:].max() == 0


def test_cancelled_run_resumes_where_it_stopped(tmp_path, fake_segment):
    image, truth = shapes_slide()
    path = write_pyramid(tmp_path / "shapes.tif", image, mpp=2.0, levels=2)
    seen = []
    cancel = threading.Event()

    def progress(done, total):
        seen.append((done, total))
        if done == 3:
            cancel.set()

    segment_slide(fake_model(), path, tmp_path / "whole.zarr", chunk_size=256, halo=32)
    uninterrupted = len(fake_segment)
    fake_segment.clear()
    with pytest.raises(Cancelled):
        segment_slide(fake_model(), path, tmp_path / "out.zarr", chunk_size=256, halo=32, progress=progress,
                      cancel=cancel)
    assert 3 <= len(fake_segment) < uninterrupted
    seen.clear()
    result = segment_slide(fake_model(), path, tmp_path / "out.zarr", chunk_size=256, halo=32, progress=progress)
    assert seen[0][0] == 3 and seen[-1][0] == seen[-1][1] == result.chunks_with_tissue
    assert len(fake_segment) == uninterrupted  # no window segmented twice
    assert_one_id_per_object(open_labels(result.store)[0][:], truth)
    # Other settings start afresh.
    again = segment_slide(fake_model(), path, tmp_path / "out.zarr", chunk_size=512, halo=32)
    assert again.chunks == 6


def test_region_and_exports(tmp_path, fake_segment):
    shapely = pytest.importorskip("shapely.geometry")
    image, truth = shapes_slide()
    path = write_pyramid(tmp_path / "shapes.tif", image, mpp=2.0, levels=2)
    # x, y, width, height: objects 3, 4 and 5 whole, 2 cut by the region's edge.
    result = segment_slide(fake_model(), path, tmp_path / "out.zarr", region=(400, 400, 700, 450),
                           chunk_size=256, halo=32)
    assert result.origin == (400, 400) and result.shape == (450, 700)
    labels = open_labels(result.store)
    np.testing.assert_array_equal(labels[0][:] > 0, truth[400:850, 400:1100] > 0)
    n = export_objects(labels[0], result.objects, mpp=result.mpp, origin=result.origin, task="glands",
                       geojson=tmp_path / "o.geojson", csv_path=tmp_path / "o.csv")
    assert n == len(result.objects) == 3
    collection = json.loads((tmp_path / "o.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 3
    for feature in collection["features"]:
        geometry = shapely.shape(feature["geometry"])
        assert geometry.is_valid
        assert feature["properties"]["classification"]["name"] == "glands"
        assert abs(geometry.area - feature["properties"]["measurements"]["area_px"]) < 0.02 * geometry.area
    # Slide coordinates: the disk of object 4 is centred at x=800, y=700 of the slide.
    centres = sorted((round(shapely.shape(f["geometry"]).centroid.x), round(shapely.shape(f["geometry"]).centroid.y))
                     for f in collection["features"])
    assert (800, 700) in centres
    rows = list(csv.DictReader((tmp_path / "o.csv").open()))
    assert sorted(int(r["id"]) for r in rows) == sorted(result.objects)
    disk = next(r for r in rows if round(float(r["centroid_x_px"])) == 800)
    assert float(disk["area_um2"]) == pytest.approx((truth == 4).sum() * 4.0)
    assert float(disk["mean_probability"]) == pytest.approx(0.9)
    tiff = write_labels_tiff(labels, tmp_path / "labels.tif", result.mpp)
    with tifffile.TiffFile(tiff) as tif:
        assert len(tif.series[0].levels) == len(labels)
        np.testing.assert_array_equal(tif.series[0].asarray(), labels[0][:])


@pytest.fixture(scope="module")
def unet_glands():
    import torch

    from glas_seg.backend.registry import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model("unet-glands", "cpu")
    torch.set_num_threads(threads)


def test_glas_image_on_a_slide_segments_as_on_its_own(tmp_path, shared_data, unet_glands):
    """A GlaS image on blank glass, cut by 256-pixel chunks: every gland keeps one id and the
    slide finds the glands as well as segmenting the image alone."""
    from glas_seg.backend.image_io import read_image, read_labels
    from glas_seg.backend.metrics import object_detection_counts, f1_from_counts

    image = read_image(shared_data / "glas" / "train" / "train_12.bmp")
    truth = read_labels(shared_data / "glas" / "train" / "train_12_anno.bmp")
    canvas = np.full((image.shape[0] + 500, image.shape[1] + 700, 3), 242, np.uint8)
    canvas[300 : 300 + image.shape[0], 400 : 400 + image.shape[1]] = image
    path = write_pyramid(tmp_path / "glas.tif", canvas, mpp=0.62, levels=2, tile=256)
    result = segment_slide(unet_glands, path, tmp_path / "glas.zarr", chunk_size=256, halo=128)
    labels = open_labels(result.store)[0][300 : 300 + image.shape[0], 400 : 400 + image.shape[1]]
    alone = inference.segment(unet_glands, image).labels
    missed = 0
    for index in range(1, alone.max() + 1):
        ids, counts = np.unique(labels[alone == index], return_counts=True)
        counts = counts[ids > 0]
        missed += counts.sum() < 0.5 * (alone == index).sum()
        assert not counts.size or counts.max() >= 0.9 * counts.sum(), f"gland {index} split into {ids}"
    assert missed <= 2, f"{missed} of {alone.max()} glands found alone are missing on the slide"
    f1 = {name: f1_from_counts(**object_detection_counts(seg, truth)) for name, seg in
          (("slide", labels), ("alone", alone))}
    assert f1["slide"] >= f1["alone"] - 0.05, f1
    assert len(result.objects) == len(np.unique(labels[labels > 0]))


def test_cli_segment_slide_real_aperio_region(tmp_path, shared_data, capsys, one_torch_thread):
    from glas_seg.cli import main

    svs = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    assert main(["segment-slide", str(svs), "--out", str(tmp_path), "--device", "cpu",
                 "--region", "1200,800,700,600"]) == 0
    stem = tmp_path / "CMU-1-Small-Region"
    with tifffile.TiffFile(f"{stem}_labels.tif") as tif:
        labels = tif.series[0].asarray()
        assert labels.shape == (600, 700) and labels.dtype == np.uint32
        numerator, denominator = tif.pages[0].tags["XResolution"].value  # pixels per centimetre
        assert numerator / denominator == pytest.approx(1e4 / 0.499, rel=1e-3)
    ids = set(np.unique(labels[labels > 0]).tolist())
    assert len(ids) >= 2  # glands in this part of the slide
    rows = list(csv.DictReader(open(f"{stem}_objects.csv")))
    assert {int(r["id"]) for r in rows} == ids
    features = json.loads(open(f"{stem}_objects.geojson").read())["features"]
    assert len(features) == len(ids)
    shapely = pytest.importorskip("shapely.geometry")
    bounds = np.array([shapely.shape(f["geometry"]).bounds for f in features])  # Polygon or MultiPolygon
    assert 1200 <= bounds[:, 0].min() and bounds[:, 2].max() <= 1900  # slide coordinates, not the region's
    err = capsys.readouterr().err
    assert f"{len(ids)} glands" in err and "wrote" in err
    # Bad input: one line, exit 2, before any work.
    assert main(["segment-slide", str(svs), "--out", str(tmp_path), "--region", "2000,0,700,600"]) == 2
    assert capsys.readouterr().err.strip().startswith("glas-seg: error: region x=2000")


def test_stray_pixels_of_an_object_do_not_make_it_cut():
    """A few pixels of an object left at a window's edge (as the glass mask can leave them) are
    cleared, so the object is whole, kept by its own chunk and never claims the edge."""
    from glas_seg.backend.slide_segment import chunk_pieces

    labels = np.zeros((100, 100), np.int32)
    labels[40:60, 40:60] = 1
    labels[0:2, 70:72] = 1  # stray pixels on the window's top edge
    pieces = chunk_pieces(labels, (100, 200, 100, 200), (120, 180, 120, 180), (1000, 1000))
    [(index, box, cut)] = pieces
    assert index == 1 and not cut and box == (slice(40, 60), slice(40, 60))
    assert labels[0:2, 70:72].sum() == 0 and (labels == 1).sum() == 400


def test_windows_are_read_in_few_shapes(tmp_path, fake_segment, monkeypatch):
    """Windows grow (with real slide pixels) to a multiple of WINDOW_STEP model pixels a side, so the
    network sees few input shapes (oneDNN keeps kernels per shape); the labels are unchanged."""
    image, truth = shapes_slide(height=1400)
    path = write_pyramid(tmp_path / "shapes.tif", image, mpp=2.0, levels=2)
    exact = segment_slide(fake_model(), path, tmp_path / "exact.zarr", chunk_size=256, halo=32)
    exact_shapes = set(fake_segment)
    fake_segment.clear()
    monkeypatch.setattr(slide_segment, "WINDOW_STEP", 64)
    grown = segment_slide(fake_model(), path, tmp_path / "grown.zarr", chunk_size=256, halo=32)
    H, W = image.shape[:2]
    # Every side is a multiple of 64 model pixels unless the slide itself is smaller.
    assert all((h % 64 == 0 or h == H) and (w % 64 == 0 or w == W) for h, w, _ in fake_segment)
    assert len(set(fake_segment)) < len(exact_shapes)
    np.testing.assert_array_equal(grown.labels(0)[:], exact.labels(0)[:])
    assert_one_id_per_object(grown.labels(0)[:], truth)


def test_grow_to_step_stays_inside_and_centred():
    from glas_seg.backend.slide_segment import _grow_to_step, _model_length

    for start, stop, limit, per_pixel in [(100, 400, 10_000, 1.0), (0, 50, 10_000, 1.0), (9_900, 9_990, 10_000, 1.0),
                                          (100, 401, 10_000, 0.806), (5, 1_700, 10_000, 2.0), (10, 90, 100, 1.0)]:
        a, b = _grow_to_step(start, stop, limit, per_pixel)
        assert 0 <= a <= start and stop <= b <= limit
        model = _model_length(b - a, per_pixel)
        assert model % slide_segment.WINDOW_STEP == 0 or b - a == limit
        assert abs(model - (b - a) * per_pixel) <= 1.5
