"""Watershed thresholds chosen on annotated images (backend/calibrate.py) and their use in
segmentation, fine-tuning, model files and exports."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from glas_seg.backend.calibrate import calibrate_thresholds
from glas_seg.backend.checkpoint import config_replace
from glas_seg.backend.errors import GlasSegError
from glas_seg.backend.inference import segment
from glas_seg.backend.metrics import match_stack, object_scores
from glas_seg.backend.model_schema import config_faults
from glas_seg.backend.registry import LoadedModel, find_model, load_model
from glas_seg.backend.settings import FinetuneSettings


@pytest.fixture(scope="module")
def glas_crops(shared_data, one_torch_thread):
    """Two malignant GlaS validation images (where the default thresholds are not the best), cropped."""
    from glas_seg.backend.data import load_sample

    folder = shared_data / "glas" / "train"
    samples = [load_sample(n, folder / f"{n}.bmp", folder / f"{n}_anno.bmp") for n in ("train_5", "train_17")]
    return [s.image[:320, :448] for s in samples], [s.labels[:320, :448] for s in samples]


def _score(model, images, labels) -> float:
    matches = [m for image, truth in zip(images, labels) for m in match_stack(segment(model, image).labels, truth)]
    scores = object_scores(matches)
    return scores["object_f1"] + scores["object_dice"]


def test_calibrated_thresholds_score_as_reported_when_segment_uses_them(glas_crops):
    images, labels = glas_crops
    model = load_model("unet-glands", "cpu")
    result = calibrate_thresholds(model, images, labels)
    assert len(result.table) >= 25
    assert result.after["score"] >= result.before["score"]
    assert max(row["score"] for row in result.table) == result.after["score"]
    # Same numbers through segment() with the chosen pair in the model's configuration: one
    # post-processing path for calibration and segmentation.
    before = _score(model, images, labels)
    assert before == pytest.approx(result.before["score"], abs=2e-4)
    tuned = LoadedModel(model.network, config_replace(model.config, interior_threshold=result.interior_threshold,
                                                      foreground_threshold=result.foreground_threshold), model.device)
    assert _score(tuned, images, labels) == pytest.approx(result.after["score"], abs=2e-4)


def test_region_masks_limit_what_is_scored(glas_crops):
    images, labels = glas_crops
    model = load_model("unet-glands", "cpu")
    empty = [np.zeros(label.shape, bool) for label in labels]
    result = calibrate_thresholds(model, images, labels, masks=empty, grid=(0.5,))
    # Nothing corrected, nothing to score: every pair ties and the model's own is kept.
    assert result.after == result.before and not result.changed
    with pytest.raises(GlasSegError, match="one label map per image"):
        calibrate_thresholds(model, images, labels[:1])
    with pytest.raises(GlasSegError, match="labels or region mask"):
        calibrate_thresholds(model, images, [labels[0], labels[1][:10]])


def test_thresholds_only_finetune_keeps_weights_and_base_file(glas_crops):
    from safetensors.torch import load_file

    from glas_seg.backend.data import Sample
    from glas_seg.backend.finetune import finetune

    images, labels = glas_crops
    base = find_model("unet-glands")
    digest = hashlib.sha256(base.path.read_bytes()).hexdigest()
    samples = [Sample(f"crop{i}", image, label) for i, (image, label) in enumerate(zip(images, labels))]
    result = finetune("unet-glands", samples, "unet-thresholds", FinetuneSettings(layers="none", calibrate=True,
                                                                                   device="cpu"))
    assert hashlib.sha256(base.path.read_bytes()).hexdigest() == digest
    tuned = load_model(result.entry.name, "cpu")
    record = tuned.config.training["calibration"]
    assert (tuned.config.interior_threshold, tuned.config.foreground_threshold) == (
        record["interior_threshold"], record["foreground_threshold"])
    assert record["on_train_images_after"]["score"] >= record["on_train_images_before"]["score"]
    assert tuned.config.training["iterations"] == 0
    new, old = load_file(result.entry.path), load_file(base.path)
    assert new.keys() == old.keys()
    assert all(np.array_equal(new[k].float().numpy(), old[k].float().numpy()) for k in old)


def test_threshold_settings_and_model_files_are_checked():
    with pytest.raises(GlasSegError, match="changes nothing"):
        FinetuneSettings(layers="none", calibrate=False)
    # "auto" (None): thresholds when only the head trains or nothing does, not with every layer.
    auto = FinetuneSettings()
    assert [auto.resolve_calibrate(layers) for layers in ("head", "none", "decoder", "all")] == [True, True, False, False]
    assert FinetuneSettings(calibrate=False).resolve_calibrate("head") is False
    assert FinetuneSettings(calibrate=True).resolve_calibrate("all") is True
    config = load_model("unet-glands", "cpu").config
    data = config_replace(config, interior_threshold=1.5).__dict__
    assert any("interior_threshold" in fault for fault in config_faults(data))
    assert not config_faults(config_replace(config, foreground_threshold=0.3).__dict__)
