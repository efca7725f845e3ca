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
    # "auto" (None): thresholds only when no layer trains (docs/finetuning.md, the default gland model).
    auto = FinetuneSettings()
    assert [auto.resolve_calibrate(layers) for layers in ("head", "none", "decoder", "all")] == [False, True, False, False]
    assert FinetuneSettings(calibrate=False).resolve_calibrate("head") is False
    assert FinetuneSettings(calibrate=True).resolve_calibrate("all") is True
    config = load_model("unet-glands", "cpu").config
    data = config_replace(config, interior_threshold=1.5).__dict__
    assert any("interior_threshold" in fault for fault in config_faults(data))
    assert not config_faults(config_replace(config, foreground_threshold=0.3).__dict__)


def _fake_calibration(model, images, labels, **kwargs):
    from glas_seg.backend.calibrate import Calibration

    return Calibration(0.4, 0.6, 400, {"object_f1": 0.5, "object_dice": 0.5, "score": 1.0},
                       {"object_f1": 0.7, "object_dice": 0.6, "score": 1.3})


@pytest.mark.parametrize("held_back_f1, kept", [(0.5, False), (0.8, True)])
def test_thresholds_are_kept_only_when_the_held_back_images_agree(glas_crops, monkeypatch, held_back_f1, kept):
    """With held-back images, thresholds chosen on the training images must not lower their score."""
    from glas_seg.backend import finetune as finetune_module
    from glas_seg.backend.data import Sample

    def fake_evaluate(model, samples, masks=None, cancel=None, progress=None):
        tuned = model.config.interior_threshold != 0.5
        f1 = held_back_f1 if tuned else 0.6
        return {"pixel_dice": f1, "object_f1": f1, "object_f1_pooled": f1, "object_dice": f1, "object_hausdorff": 1.0}

    monkeypatch.setattr(finetune_module, "calibrate_thresholds", _fake_calibration)
    monkeypatch.setattr(finetune_module, "evaluate", fake_evaluate)
    images, labels = glas_crops
    samples = [Sample(f"crop{i}", image, label) for i, (image, label) in enumerate(zip(images, labels))]
    result = finetune_module.finetune("unet-glands", samples, f"thr-{kept}", FinetuneSettings(layers="none", device="cpu"),
                                      val_samples=samples[1:])
    config = load_model(result.entry.name, "cpu").config
    assert result.thresholds["chosen"] is kept
    assert (config.interior_threshold, config.foreground_threshold) == ((0.4, 0.6) if kept else (0.5, 0.5))
    assert result.after["object_f1"] == (held_back_f1 if kept else 0.6)
    assert ("chosen on the corrected images" in finetune_module.format_thresholds(result)) is kept


def test_detection_models_have_no_thresholds_to_choose(glas_crops):
    from glas_seg.backend.data import Sample
    from glas_seg.backend.finetune import finetune

    images, labels = glas_crops
    with pytest.raises(GlasSegError, match="detects objects directly"):
        finetune("maskrcnn-glands", [Sample("a", images[0], labels[0])], "mrcnn-thr",
                 FinetuneSettings(layers="none", device="cpu"))


def test_smallest_object_size_is_searched_and_reproduced_by_segment(glas_crops):
    """min_sizes adds the smallest object kept to the search; segment() with the chosen size in the
    model's configuration scores what calibration reported."""
    from glas_seg.backend.calibrate import min_size_grid

    images, labels = glas_crops
    model = load_model("unet-glands", "cpu")
    sizes = min_size_grid(model.config.min_size)
    assert sizes == (400, 800, 1200, 1600, 2000, 2400, 3000)
    result = calibrate_thresholds(model, images, labels, grid=(), min_sizes=sizes)
    assert sorted(row["min_size"] for row in result.table) == list(sizes)
    assert {(row["interior_threshold"], row["foreground_threshold"]) for row in result.table} == {(0.5, 0.5)}
    assert result.before["score"] == pytest.approx(_score(model, images, labels), abs=2e-4)
    by_size = {row["min_size"]: row["score"] for row in result.table}
    assert by_size[3000] != by_size[400]  # the size matters on these images, so the choice is a real one
    tuned = LoadedModel(model.network, config_replace(model.config, min_size=result.min_size), model.device)
    assert _score(tuned, images, labels) == pytest.approx(result.after["score"], abs=2e-4)
    assert result.after["score"] == max(by_size.values())


def test_training_chooses_the_smallest_object_on_its_own_training_images(glas_crops, tmp_path):
    """The step `glas-seg train --choose-min-size` runs at every validation: the size that scores
    best on the training images, as segment() then scores it."""
    from glas_seg.backend.data import Sample
    from glas_seg.backend.training import choose_min_size

    images, labels = glas_crops
    samples = [Sample(f"crop{i}", image, label) for i, (image, label) in enumerate(zip(images, labels))]
    model = load_model("unet-glands", "cpu")
    with pytest.raises(GlasSegError, match="needs the training images"):
        choose_min_size(model, [])
    choice = choose_min_size(model, samples)
    assert [row["min_size"] for row in choice["table"]] == [400, 800, 1200, 1600, 2000, 2400, 3000]
    assert choice["before"]["min_size"] == 400 and choice["after"]["score"] >= choice["before"]["score"]
    tuned = LoadedModel(model.network, config_replace(model.config, min_size=choice["min_size"]), model.device)
    assert _score(tuned, images, labels) == pytest.approx(choice["after"]["score"], abs=2e-4)
    with pytest.raises(GlasSegError, match="detect objects directly"):
        choose_min_size(load_model("maskrcnn-glands", "cpu"), samples)
    # train() refuses the option for a detection model before it writes anything.
    from glas_seg.backend.training import TrainSettings, train

    detector = load_model("maskrcnn-glands", "cpu").config
    with pytest.raises(GlasSegError, match="no watershed size"):
        train(detector, TrainSettings(iterations=1, choose_min_size=True), samples, samples, tmp_path / "run")
    assert not (tmp_path / "run").exists()
