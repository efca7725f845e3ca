import threading

import numpy as np
import pytest
import torch

from glas_seg.backend.checkpoint import ModelConfig, read_config, save_model
from glas_seg.backend.inference import Cancelled, predict_probabilities, segment, tile_starts
from glas_seg.backend.registry import LoadedModel, build_model, find_model, load_model


def small_model(depth=2, width=8, scale=1.0, tile=64, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(name="tiny", architecture="unet", arch_kwargs={"width": width, "depth": depth},
                         scale=scale, tile_size=tile, min_size=20)
    network = build_model(config).eval()
    return LoadedModel(network, config, torch.device("cpu"))


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (150, 230, 3), dtype=np.uint8)


def test_tile_starts_cover_and_end_flush():
    assert tile_starts(100, 100, 75) == [0]
    assert tile_starts(230, 64, 48) == [0, 48, 96, 144, 166]
    assert tile_starts(50, 64, 48) == [0]


def test_tiled_probabilities_match_whole_image(image):
    model = small_model()
    whole = predict_probabilities(model, image, tile_size=512)
    tiled = predict_probabilities(model, image, tile_size=64, overlap=0.5)
    assert whole.shape == tiled.shape == (3, 150, 230)
    np.testing.assert_allclose(tiled.sum(0), 1, atol=1e-5)
    difference = np.abs(whole - tiled)
    assert difference.mean() < 0.005 and difference.max() < 0.05
    # No seams: the rows and columns where tiles meet differ no more than the rest.
    seam_cols = difference[:, :, [47, 48, 95, 96]].mean()
    assert seam_cols < 4 * difference.mean() + 1e-3


def test_bundled_model_tiles_agree():
    from glas_seg._sample_data import glas_sample

    sample = glas_sample()[0][0]  # 574x433 -> 287x217 at the working scale
    model = load_model("unet-glands", "cpu")
    whole = predict_probabilities(model, sample, tile_size=1024)
    tiled = predict_probabilities(model, sample, tile_size=128, overlap=0.5)  # 12 tiles
    difference = np.abs(whole - tiled)
    assert difference.mean() < 0.01
    assert (whole.argmax(0) == tiled.argmax(0)).mean() > 0.98


def test_flip_tta_and_scale(image):
    model = small_model(scale=0.5)
    probs = predict_probabilities(model, image, tta=True)
    assert probs.shape == (3, 75, 115)
    result = segment(model, image)
    assert result.labels.shape == image.shape[:2] and result.labels.dtype == np.int32


def test_progress_and_cancel(image):
    model = small_model()
    calls = []
    predict_probabilities(model, image, tile_size=64, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] and len(calls) > 1
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        predict_probabilities(model, image, tile_size=64, cancel=event)


def test_model_file_roundtrip_and_errors(tmp_path, image):
    model = small_model()
    path = save_model(tmp_path / "m.safetensors", model.network, model.config, half=True)
    assert read_config(path).arch_kwargs == {"width": 8, "depth": 2}
    loaded = load_model(path, "cpu")
    a = predict_probabilities(model, image)
    b = predict_probabilities(loaded, image)
    assert np.abs(a - b).max() < 0.01  # float16 storage
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable glas-seg model"):
        load_model(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="No model named"):
        find_model("does-not-exist")
    assert not list(tmp_path.glob("*.part"))


def test_bundled_default_model_is_listed():
    entry = find_model("unet-glands")
    assert entry.source == "bundled" and entry.config.task == "glands"
    assert entry.config.training.get("validation"), "bundled model must record its validation numbers"
