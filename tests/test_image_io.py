import numpy as np
import pytest
import tifffile
from skimage import io as skio

from glas_seg.backend.image_io import read_image, read_labels, to_float_rgb


def test_uint8_rgb_is_divided_by_255():
    image = np.array([[[0, 128, 255]] * 16] * 16, dtype=np.uint8)
    out = to_float_rgb(image)
    assert out.dtype == np.float32 and out.shape == (16, 16, 3)
    np.testing.assert_allclose(out[0, 0], [0, 128 / 255, 1])


@pytest.mark.parametrize("convert", [
    lambda im: im.astype(np.uint16) * 257,          # full 16-bit range
    lambda im: im.astype(np.float32) / 255,         # float in [0, 1]
    lambda im: im.astype(np.float64),               # float in [0, 255]
    lambda im: np.concatenate([im, np.full(im.shape[:2] + (1,), 255, np.uint8)], -1),  # RGBA
])
def test_other_encodings_normalise_like_uint8(convert):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image[0, 0] = 255  # make sure the full range is used
    np.testing.assert_allclose(to_float_rgb(convert(image)), to_float_rgb(image), atol=1e-6)


def test_grey_is_repeated_to_three_channels():
    grey = np.arange(400, dtype=np.uint8).reshape(20, 20)
    out = to_float_rgb(grey)
    assert out.shape == (20, 20, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_twelve_bit_data_in_uint16_uses_4095():
    image = np.full((16, 16, 3), 4095, dtype=np.uint16)
    assert to_float_rgb(image).max() == pytest.approx(1.0)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((10, 10, 3), np.uint8), "too small"),
    (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
    (np.zeros((2, 3, 32, 32, 3), np.uint8), "2D grey, RGB or RGBA"),
])
def test_bad_images_are_refused_with_a_message(bad, message):
    with pytest.raises(ValueError, match=message):
        to_float_rgb(bad)


def test_read_image_and_labels_roundtrip(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    skio.imsave(tmp_path / "a.png", image, check_contrast=False)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), image)
    labels = np.zeros((24, 40), np.uint32)
    labels[2:8, 3:9] = 70000
    tifffile.imwrite(tmp_path / "a_labels.tif", labels)
    out = read_labels(tmp_path / "a_labels.tif")
    assert out.dtype.kind == "i" and out.max() == 70000


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such image"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        read_image(tmp_path / "broken.png")
