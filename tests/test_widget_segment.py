"""Segment widget wiring with a real napari viewer (runs under Xvfb)."""

import numpy as np
import pytest
from conftest import run_and_wait

from glas_seg._sample_data import glas_sample
from glas_seg._widget_segment import SegmentWidget
from glas_seg.backend.registry import DEFAULT_MODEL

pytestmark = pytest.mark.gui


@pytest.fixture
def widget(docked):
    return docked(SegmentWidget)


def add_sample(viewer):
    for data, meta, kind in glas_sample():
        getattr(viewer, f"add_{kind}")(data, **meta)
    return viewer.layers["glas_train_12"]


def test_segment_sample_gives_many_glands(widget, qtbot):
    viewer, w = widget
    layer = add_sample(viewer)
    viewer.layers.selection.active = layer
    assert w.image.value is layer and w.model.value == DEFAULT_MODEL
    assert run_and_wait(qtbot, w) == "done"
    out = viewer.layers["glas_train_12 glands"]
    assert out.data.shape == layer.data.shape[:2]
    assert len(np.unique(out.data)) - 1 >= 8
    assert "glands" in w.status.value


def test_rerun_replaces_only_unedited_layer(widget, qtbot):
    viewer, w = widget
    add_sample(viewer)
    w.image.value = viewer.layers["glas_train_12"]
    run_and_wait(qtbot, w)
    first = viewer.layers["glas_train_12 glands"]
    run_and_wait(qtbot, w)
    assert [l.name for l in viewer.layers].count("glas_train_12 glands") == 1  # replaced in place
    edited = first.data.copy()
    edited[:10, :10] = 999
    first.data = edited
    run_and_wait(qtbot, w)
    assert viewer.layers["glas_train_12 glands"].data[0, 0] == 999  # the user's edit survives
    assert "glas_train_12 glands [2]" in viewer.layers


def test_cancel_leaves_no_layer(widget, qtbot):
    viewer, w = widget
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8), name="big", rgb=True)
    w.image.value = viewer.layers["big"]
    w.tile_size.value = 128
    with qtbot.waitSignal(w.task.finished, timeout=60000) as blocker:
        w.run()
        w.task.cancel()
    assert blocker.args[0] == "cancelled"
    assert [l.name for l in viewer.layers] == ["big"]
    assert w.run_button.enabled


@pytest.mark.parametrize("data, rgb, message", [
    (np.zeros((10, 10, 3), np.uint8), True, "too small"),
    (np.full((64, 64), np.nan, np.float32), False, "NaN"),
])
def test_bad_images_give_a_message_and_keep_layers(widget, qtbot, data, rgb, message):
    viewer, w = widget
    viewer.add_image(data, name="bad", rgb=rgb)
    w.image.value = viewer.layers["bad"]
    assert run_and_wait(qtbot, w) == "failed"
    assert message in w.task.last_error and message in w.status.value
    assert [l.name for l in viewer.layers] == ["bad"]


def test_no_image_layer_warns(widget, qtbot):
    viewer, w = widget
    viewer.add_labels(np.zeros((32, 32), np.int32), name="labels only")
    assert w.image.value is None
    w.run()  # a notification, no exception, no worker
    assert not w.task.running and len(viewer.layers) == 1


def test_uint16_rgba_and_stacks(widget, qtbot):
    viewer, w = widget
    image = glas_sample()[0][0][:256, :256]
    rgba = np.concatenate([image.astype(np.uint16) * 257, np.full(image.shape[:2] + (1,), 65535, np.uint16)], -1)
    viewer.add_image(rgba, name="rgba16", rgb=True)
    w.image.value = viewer.layers["rgba16"]
    assert run_and_wait(qtbot, w) == "done"
    assert viewer.layers["rgba16 glands"].data.shape == (256, 256)

    stack = np.stack([image, image[::-1]])[None]  # (1, 2, H, W, 3): a 4D stack of RGB planes
    viewer.add_image(stack, name="stack", rgb=True)
    w.image.value = viewer.layers["stack"]
    w.planes.value = "all planes"
    assert run_and_wait(qtbot, w) == "done"
    labels = viewer.layers["stack glands"].data
    assert labels.shape == (1, 2, 256, 256) and labels[0, 0].max() > 0 and labels[0, 1].max() > 0
    w.planes.value = "current plane"
    run_and_wait(qtbot, w)  # replaces the unedited layer: only the current plane is filled now
    labels = viewer.layers["stack glands"].data
    assert labels.shape == (1, 2, 256, 256) and (labels[0, 0].max() > 0) != (labels[0, 1].max() > 0)


def test_damaged_model_files_give_messages(widget, qtbot):
    """A truncated file is left out of the list; weights that do not fit fail with a message."""
    import os

    import torch

    from glas_seg.backend.checkpoint import ModelConfig, save_model
    from glas_seg.backend.registry import build_model, find_model

    viewer, w = widget
    store = os.environ["GLAS_SEG_MODEL_DIR"]
    truncated = find_model("unet-glands").path.read_bytes()[:-4096]
    with open(f"{store}/truncated.safetensors", "wb") as f:
        f.write(truncated)
    small = ModelConfig(name="mismatch", architecture="unet", arch_kwargs={"width": 8, "depth": 2})
    wrong = ModelConfig(name="mismatch", architecture="unet", arch_kwargs={"width": 16, "depth": 4})
    torch.manual_seed(0)
    save_model(f"{store}/mismatch.safetensors", build_model(small), wrong)  # header claims another size
    add_sample(viewer)
    w.image.value = viewer.layers["glas_train_12"]
    w.refresh_models(select="mismatch")
    assert "truncated" not in w.model.choices and w.model.value == "mismatch"
    assert run_and_wait(qtbot, w) == "failed"
    assert "mismatch" in w.task.last_error and "weights" in w.task.last_error  # names the file and what is wrong
    assert [layer.name for layer in viewer.layers] == ["glas_train_12", "glas_train_12 ground truth"]


def test_manifest_opens_widget_and_sample(make_napari_viewer):
    """What `napari -w glas-seg` and File > Open Sample do, through npe2."""
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("glas-seg", "Segment")
    assert isinstance(widget, SegmentWidget)
    viewer.open_sample("glas-seg", "glas")
    assert viewer.layers["glas_train_12"].rgb
    assert widget.image.value is viewer.layers["glas_train_12"]


def test_unet_plus_plus_inference_mode(widget, qtbot):
    """Models with several inference modes show the mode choice, and segmenting uses it."""
    import os

    import torch

    from glas_seg.backend.checkpoint import ModelConfig, save_model
    from glas_seg.backend.registry import build_model, load_model

    viewer, w = widget
    config = ModelConfig(name="upp", architecture="unet_plus_plus", arch_kwargs={"width": 4, "depth": 3}, min_size=0)
    torch.manual_seed(0)
    save_model(f"{os.environ['GLAS_SEG_MODEL_DIR']}/upp.safetensors", build_model(config), config)
    assert load_model("upp", "cpu", mode="fast").network.mode == "fast"
    with pytest.raises(ValueError, match="no inference modes"):
        load_model("unet-glands", "cpu", mode="fast")

    add_sample(viewer)
    w.image.value = viewer.layers["glas_train_12"]
    w.refresh_models(select="upp")
    assert w._has_modes and w.mode.choices == ("accurate", "fast")
    w.mode.value = "fast"
    assert run_and_wait(qtbot, w) == "done"
    assert viewer.layers["glas_train_12 glands"].data.shape == (433, 574)
    w.model.value = "unet-glands"
    assert not w._has_modes


def test_mask_rcnn_model_segments_and_turns_flips_off(widget, qtbot):
    """Instance models run through the same widget; flip averaging does not apply to them."""
    import os

    import torch

    from glas_seg.backend.checkpoint import ModelConfig, save_model
    from glas_seg.backend.registry import build_model

    viewer, w = widget
    config = ModelConfig(name="mrcnn", architecture="mask_rcnn", arch_kwargs={"fpn_channels": 16, "score_threshold": 0.0},
                         min_size=0, tile_size=256)
    torch.manual_seed(0)
    save_model(f"{os.environ['GLAS_SEG_MODEL_DIR']}/mrcnn.safetensors", build_model(config).eval(), config)
    add_sample(viewer)
    w.image.value = viewer.layers["glas_train_12"]
    w.tta.value = True
    w.probabilities.value = True
    w.refresh_models(select="mrcnn")
    assert not w.tta.enabled and not w.tta.value
    assert run_and_wait(qtbot, w) == "done"
    labels = viewer.layers["glas_train_12 glands"].data
    assert labels.shape == (433, 574) and labels.max() > 0
    assert "glas_train_12 gland probability" in viewer.layers
    w.model.value = "unet-glands"
    assert w.tta.enabled


def test_task_panel_status_gives_progress_elapsed_and_time_left(qtbot):
    """Long work (a slide's chunks, a batch of planes) says how far it is and how long is left."""
    import time

    from glas_seg._background import TaskPanel

    panel = TaskPanel("Segment")
    panel._status_text, panel._started = "Segmenting slide...", time.perf_counter() - 10
    panel._on_progress(2, 10)  # 5 s per chunk so far, 8 to go
    assert panel.status.value.startswith("Segmenting slide... 2 / 10, 0:10 elapsed, about 0:40 left")
    quiet = TaskPanel("Fine-tune", show_time_left=False)  # the widget shows its own timing
    quiet.status.value = "Fine-tuning..."
    quiet._on_progress(2, 10)
    assert quiet.status.value == "Fine-tuning..."
