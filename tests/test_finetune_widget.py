"""Fine-tune widget in a real viewer: train on the sample, new model in the Segment dropdown, cancel."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from glas_seg._sample_data import glas_sample
from glas_seg._widget_finetune import FinetuneWidget, shape_regions
from glas_seg._widget_segment import SegmentWidget
from glas_seg.backend import model_store
from glas_seg.backend.checkpoint import ModelConfig
from glas_seg.backend.registry import build_model, user_model_dir

pytestmark = pytest.mark.gui


@pytest.fixture
def tiny_base() -> str:
    """A small user model to start from, so the test does not depend on the bundled one."""
    torch.manual_seed(0)
    config = ModelConfig(name="tiny-base", architecture="unet", arch_kwargs={"width": 4, "depth": 2}, min_size=50)
    model_store.save_user_model(build_model(config), config)
    return "tiny-base"


@pytest.fixture
def viewer_with_sample(make_napari_viewer):
    viewer = make_napari_viewer()
    (image, image_kw, _), (labels, labels_kw, _) = glas_sample()
    viewer.add_image(image, **image_kw)
    corrected = viewer.add_labels(labels, name="glas_train_12 corrected")
    return viewer, viewer.layers["glas_train_12"], corrected


def open_widgets(viewer) -> tuple[FinetuneWidget, SegmentWidget]:
    _, segment = viewer.window.add_plugin_dock_widget("glas-seg", "Segment")
    _, finetune = viewer.window.add_plugin_dock_widget("glas-seg", "Fine-tune")
    assert isinstance(finetune, FinetuneWidget) and isinstance(segment, SegmentWidget)
    return finetune, segment


def wait_idle(qtbot, task, timeout=600_000) -> None:
    qtbot.waitUntil(lambda: not task.running, timeout=timeout)


def test_finetune_on_the_sample_adds_a_model_that_segments(viewer_with_sample, tiny_base, qtbot):
    viewer, image, corrected = viewer_with_sample
    finetune, segment = open_widgets(viewer)
    finetune.base.value = tiny_base
    assert finetune.pair_rows[0].image_layer.value is image
    assert finetune.pair_rows[0].labels_layer.value is corrected
    assert finetune.new_name.value == "tiny-base-ft"
    finetune.iterations.value = 3
    image_before, labels_before = image.data.copy(), corrected.data.copy()

    finetune.run_button.native.click()
    assert finetune.task.running and not finetune.run_button.enabled
    wait_idle(qtbot, finetune.task)

    assert finetune.task.last_error is None, finetune.status.value
    assert (user_model_dir() / "tiny-base-ft.safetensors").is_file()
    assert "tiny-base-ft" in segment.model.choices and segment.model.value == "tiny-base-ft"
    assert "tiny-base-ft" in finetune.base.choices and finetune.new_name.value == "tiny-base-ft2"
    assert [e["iteration"] for e in finetune.history if "loss" in e] == [1, 2, 3]
    assert finetune.loss_axes.lines, "the loss curve was drawn"
    assert np.array_equal(image.data, image_before) and image.data.dtype == image_before.dtype
    assert np.array_equal(corrected.data, labels_before) and corrected.data.dtype == labels_before.dtype

    viewer.layers.selection.active = image
    finetune.segment_button.native.click()
    wait_idle(qtbot, segment.task)
    out = viewer.layers["glas_train_12 glands"]
    assert out.metadata["glas_seg"]["model"] == "tiny-base-ft"
    assert out.data.shape == image.data.shape[:2]
    assert np.array_equal(corrected.data, labels_before)  # segmenting made a new layer


def test_cancel_stops_quickly_and_saves_nothing(viewer_with_sample, tiny_base, qtbot):
    viewer, image, corrected = viewer_with_sample
    finetune, _ = open_widgets(viewer)
    finetune.base.value = tiny_base
    finetune.iterations.value = 5000
    base_bytes = (user_model_dir() / "tiny-base.safetensors").read_bytes()
    finetune.run_button.native.click()
    qtbot.waitUntil(lambda: any("loss" in e for e in finetune.history), timeout=300_000)
    started = time.monotonic()
    finetune.cancel_button.native.click()
    wait_idle(qtbot, finetune.task, timeout=60_000)
    stopped = time.monotonic() - started
    assert stopped < 30  # one training step at most (slow when the machine is busy)
    assert "Cancelled" in finetune.status.value
    assert sorted(p.name for p in user_model_dir().iterdir()) == ["tiny-base.safetensors"]
    assert (user_model_dir() / "tiny-base.safetensors").read_bytes() == base_bytes
    assert finetune.run_button.enabled and not finetune.segment_button.enabled


def test_shapes_rectangles_limit_training_to_regions(viewer_with_sample):
    viewer, image, corrected = viewer_with_sample
    finetune = FinetuneWidget(viewer)
    shapes = viewer.add_shapes([np.array([[10, 20], [10, 120], [90, 120], [90, 20]])], shape_type="rectangle",
                               name="corrected areas")
    finetune.regions.value = shapes
    samples, masks, description = finetune.collect()
    assert len(samples) == 1 and "corrected areas" in description
    expected = np.zeros(corrected.data.shape, bool)
    expected[10:91, 20:121] = True
    np.testing.assert_array_equal(masks[0], expected)


def test_regions_follow_layer_scale(make_napari_viewer):
    """A rectangle on a layer with another scale lands on the same pixels as on screen."""
    viewer = make_napari_viewer()
    labels = viewer.add_labels(np.zeros((50, 60), np.int32), scale=(2, 2))
    shapes = viewer.add_shapes([np.array([[20, 40], [20, 80], [60, 80], [60, 40]])], shape_type="rectangle")
    [region] = shape_regions(shapes, labels)
    np.testing.assert_allclose(region, [[10, 20], [10, 40], [30, 40], [30, 20]])


def test_input_problems_are_messages_not_crashes(viewer_with_sample, tiny_base):
    viewer, image, corrected = viewer_with_sample
    finetune = FinetuneWidget(viewer)
    finetune.base.value = tiny_base
    finetune.new_name.value = "tiny-base"  # taken
    finetune.run()
    assert "already exists" in finetune.status.value and not finetune.task.running
    finetune.new_name.value = "fresh"
    finetune.pair_rows[0].labels_layer.value = None
    finetune.run()
    assert "needs both" in finetune.status.value and not finetune.task.running
    empty = viewer.add_labels(np.zeros(corrected.data.shape, np.int32), name="empty")
    finetune.pair_rows[0].labels_layer.value = empty
    finetune.run()
    assert "no labels" in finetune.status.value and not finetune.task.running
    wrong_size = viewer.add_labels(np.ones((50, 60), np.int32), name="wrong size")
    finetune.pair_rows[0].labels_layer.value = wrong_size
    finetune.run()
    assert "does not have the size" in finetune.status.value and not finetune.task.running
    # A whole slide (multi-resolution) is refused before its full-resolution level is read.
    pyramid = viewer.add_image([image.data, image.data[::2, ::2]], rgb=True, multiscale=True, name="slide")
    finetune.pair_rows[0].image_layer.value = pyramid
    finetune.pair_rows[0].labels_layer.value = corrected
    finetune.run()
    assert "whole-slide" in finetune.status.value and not finetune.task.running


def test_store_changes_reach_the_segment_dropdown(make_napari_viewer, qtbot, tiny_base):
    viewer = make_napari_viewer()
    segment = SegmentWidget(viewer)
    assert "tiny-base" in segment.model.choices
    model_store.rename_model("tiny-base", "renamed")
    qtbot.waitUntil(lambda: "renamed" in segment.model.choices, timeout=5000)
    assert "tiny-base" not in segment.model.choices


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs an X display (xvfb-run)")
def test_opening_the_widget_in_a_running_napari_does_not_crash(tmp_path):
    """napari imports plugin widgets after its OpenGL canvas exists; importing torchvision then
    loads Triton's LLVM next to Mesa's and the process segfaulted. Run it in a fresh process
    (with its own napari settings file: the developer's window size and docks stay as they are)."""
    code = (
        "import napari\n"
        "viewer = napari.Viewer(show=True)\n"
        "_, widget = viewer.window.add_plugin_dock_widget('glas-seg', 'Fine-tune')\n"
        "import torchvision\n"
        "print('opened', type(widget).__name__)\n"
        "viewer.close()\n"
    )
    env = {**os.environ, "NAPARI_CONFIG": str(tmp_path / "napari_settings.yaml")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, f"exit code {run.returncode}: {run.stderr[-2000:]}"
    assert "opened FinetuneWidget" in run.stdout


def test_advanced_options_timing_and_before_after_report(viewer_with_sample, tiny_base, qtbot):
    """Advanced options reach the settings; the dock shows elapsed / left and, with held-back
    images, the before / after numbers."""
    from glas_seg.backend.settings import FinetuneSettings

    viewer, image, corrected = viewer_with_sample
    viewer.add_image(image.data.copy(), name="second", rgb=True)
    viewer.add_labels(corrected.data.copy(), name="second corrected")
    finetune, _ = open_widgets(viewer)
    finetune.base.value = tiny_base
    assert finetune.layers.native.isHidden()
    finetune.advanced.value = True
    assert not any(w.native.isHidden() for w in (finetune.layers, finetune.l2sp, finetune.freeze_norm))
    defaults = FinetuneSettings()
    assert finetune.settings().layers == defaults.layers and finetune.settings().l2sp == defaults.l2sp
    finetune.layers.value = "decoder"
    finetune.l2sp.value = 20.0
    finetune.augment_strength.value = 0.5
    finetune.patience.value = 1
    finetune.freeze_norm.value = False
    settings = finetune.settings()
    assert (settings.layers, settings.l2sp, settings.augment_strength, settings.patience, settings.freeze_norm) == (
        "decoder", 20.0, 0.5, 1, False)

    row = finetune.add_pair()
    row.image_layer.value = viewer.layers["second"]
    row.labels_layer.value = viewer.layers["second corrected"]
    finetune.iterations.value = 2
    finetune.val_share.value = 0.5
    finetune.run_button.native.click()
    wait_idle(qtbot, finetune.task)
    assert finetune.task.last_error is None, finetune.status.value
    assert "held-back image" in finetune.status.value and "object F1" in finetune.status.value
    assert "pixel Dice" in finetune.status.value
    assert finetune.timing.value.startswith("Took")


def test_time_left_comes_from_the_iteration_rate(make_napari_viewer):
    finetune = FinetuneWidget(make_napari_viewer())
    finetune._rate_start = None
    finetune._show_timing({"iteration": 1, "total": 101, "elapsed": 5.0})  # setup included: not the rate
    finetune._show_timing({"iteration": 11, "total": 101, "elapsed": 10.0})  # 0.5 s per iteration since
    assert finetune.timing.value == "Elapsed 0:10, about 0:45 left (0.50 s per iteration)"
