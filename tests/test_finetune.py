"""Fine-tuning backend: samples from layers, region masks, the run, cancel, memory."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import hashlib
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from glas_seg.backend import finetune as finetune_module
from glas_seg.backend import training as training_module
from glas_seg.backend import model_store
from glas_seg.backend.checkpoint import ModelConfig, load_state, read_config, save_model
from glas_seg.backend.data import PatchDataset, Sample
from glas_seg.backend.finetune import (
    FinetuneSettings, finetune, masks_from_polygons, samples_from_arrays, samples_from_folders,
)
from glas_seg.backend.inference import Cancelled, segment
from glas_seg.backend.registry import build_model, load_model, user_model_dir
from conftest import disc_sample

# calibrate=False: thresholds are covered by tests/test_calibrate.py.
FAST = dict(iterations=3, batch_size=2, crop_size=32, eval_every=3, device="cpu", calibrate=False)


def make_base(path: Path) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(name="tiny", architecture="unet", arch_kwargs={"width": 4, "depth": 2}, tile_size=64, min_size=10)
    return save_model(path, build_model(config), config)


def synthetic_sample(name: str, seed: int, size: int = 96) -> Sample:
    """Pink background with 4 purple discs; labels are the discs."""
    return disc_sample(name, seed, size, count=4, margin=15, radii=(6, 12))


@pytest.fixture
def base(tmp_path) -> Path:
    return make_base(tmp_path / "base" / "tiny.safetensors")


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def store_files() -> list[str]:
    folder = user_model_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def run_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("glas-seg-finetune-*")}


# -- regions ----------------------------------------------------------------------------------
def test_rectangle_mask_covers_its_corners_inclusive():
    mask = masks_from_polygons([np.array([[2, 3], [2, 7], [5, 7], [5, 3]])], (10, 10))
    expected = np.zeros((10, 10), bool)
    expected[2:6, 3:8] = True
    np.testing.assert_array_equal(mask, expected)


def test_polygons_are_clipped_and_combined():
    triangle = np.array([[0, 0], [0, 8], [8, 0]])
    outside = np.array([[-5, 20], [-5, 30], [30, 30], [30, 20]])  # right of the image
    overhang = np.array([[6, 6], [6, 14], [14, 14], [14, 6]])  # lower right corner, partly outside
    mask = masks_from_polygons([triangle, outside, overhang], (10, 10))
    assert mask[0, 0] and mask[0, 8] and mask[8, 0] and mask[3, 3]
    assert not mask[0, 9] and not mask[5, 5]
    assert mask[6:, 6:].all()
    np.testing.assert_array_equal(masks_from_polygons([outside], (10, 10)), np.zeros((10, 10), bool))
    with pytest.raises(ValueError, match="polygons or rectangles"):
        masks_from_polygons([np.array([[0, 0], [1, 1]])], (10, 10))


# -- samples from layer data ------------------------------------------------------------------------
def test_samples_from_a_stack_use_labelled_planes_and_copy():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (3, 40, 50, 3), dtype=np.uint8)
    labels = np.zeros((3, 40, 50), np.int32)
    labels[0, 5:15, 5:15] = 1
    labels[2, 20:30, 20:30] = 4
    image_before, labels_before = image.copy(), labels.copy()
    samples, masks = samples_from_arrays("stack", image, labels, rgb=True)
    assert [s.name for s in samples] == ["stack[0]", "stack[2]"] and masks is None
    assert samples[0].image.dtype == np.float32 and samples[0].image.shape == (40, 50, 3)
    np.testing.assert_array_equal(samples[1].labels, labels[2])
    samples[1].labels[:] = 7  # the samples are copies: the caller's arrays stay as they were
    np.testing.assert_array_equal(labels, labels_before)
    np.testing.assert_array_equal(image, image_before)


def test_regions_pick_planes_and_make_masks():
    image = np.zeros((3, 40, 50), np.uint8)  # grey stack
    labels = np.zeros((3, 40, 50), np.int32)
    labels[0, 5:15, 5:15] = 1
    region = np.array([[1, 10, 10], [1, 10, 30], [1, 20, 30], [1, 20, 10]], float)  # on plane 1, unlabeled
    samples, masks = samples_from_arrays("stack", image, labels, rgb=False, regions=[region])
    assert [s.name for s in samples] == ["stack[1]"]
    assert masks[0].sum() == 11 * 21 and masks[0][10:21, 10:31].all()


def test_mismatched_layers_are_explained_and_outside_regions_give_nothing():
    with pytest.raises(ValueError, match="do not match the image"):
        samples_from_arrays("a", np.zeros((40, 50, 3), np.uint8), np.zeros((40, 49), np.int32), rgb=True)
    with pytest.raises(ValueError, match="integers"):
        samples_from_arrays("a", np.zeros((40, 50, 3), np.uint8), np.zeros((40, 50), np.float32), rgb=True)
    outside = [np.array([[100, 100], [100, 120], [120, 120], [120, 100]])]
    assert samples_from_arrays("a", np.zeros((40, 50, 3), np.uint8), np.zeros((40, 50), np.int32), rgb=True,
                               regions=outside) == ([], [])


def test_folder_pairs_glas_style_and_two_folders(tmp_path):
    from skimage.io import imsave

    glas, images, labels = tmp_path / "glas", tmp_path / "images", tmp_path / "labels"
    for folder in (glas, images, labels):
        folder.mkdir()
    sample = synthetic_sample("x", 0, 48)
    rgb = (sample.image * 255).astype(np.uint8)
    imsave(glas / "a.bmp", rgb)
    imsave(glas / "a_anno.bmp", sample.labels.astype(np.uint8), check_contrast=False)
    imsave(images / "b.png", rgb)
    imsave(labels / "b.png", sample.labels.astype(np.uint16), check_contrast=False)
    assert [s.name for s in samples_from_folders(glas)] == ["a"]
    [b] = samples_from_folders(images, labels)
    np.testing.assert_array_equal(b.labels, sample.labels)
    with pytest.raises(ValueError, match="No image/label pairs"):
        samples_from_folders(labels, images / "..")


# -- the run ------------------------------------------------------------------------------------------
def test_finetune_adds_a_new_model_and_leaves_the_base_untouched(base):
    before = digest(base)
    samples = [synthetic_sample("a", 0), synthetic_sample("b", 1)]
    events = []
    result = finetune(str(base), samples, "tiny-ft", FinetuneSettings(**FAST), progress=events.append)
    assert digest(base) == before
    assert store_files() == ["tiny-ft.safetensors"]
    assert [e["iteration"] for e in events] == [1, 2, 3] and all(e["total"] == 3 for e in events)
    config = read_config(result.entry.path)
    assert config.name == "tiny-ft" and config.base_model == "tiny" and config.architecture == "unet"
    assert config.training["iterations"] == 3 and config.training["train_images"] == ["a", "b"]
    assert config.training["created"].endswith("+00:00")
    new, _ = load_state(result.entry.path)
    old, _ = load_state(base)
    assert any(not torch.equal(new[k], old[k]) for k in old if old[k].is_floating_point())
    labels = segment(load_model("tiny-ft", "cpu"), samples[0].image).labels
    assert labels.shape == (96, 96)


@pytest.mark.parametrize("freeze", [True, False])
def test_batch_norm_statistics_are_kept_unless_asked(base, freeze):
    result = finetune(str(base), [synthetic_sample("a", 0)], "bn", FinetuneSettings(**FAST, freeze_norm=freeze))
    new, _ = load_state(result.entry.path)
    old, _ = load_state(base)
    stats = [k for k in old if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in old if k.endswith("weight")]
    assert stats and weights
    assert all(torch.equal(new[k], old[k]) for k in stats) is freeze
    assert any(not torch.equal(new[k], old[k]) for k in weights)


def test_validation_share_reports_before_and_after(base):
    samples = [synthetic_sample(str(i), i) for i in range(3)]
    events = []
    result = finetune(str(base), samples, "v", FinetuneSettings(**FAST, val_fraction=0.34), progress=events.append)
    assert events[0]["phase"] == "scoring the base model"
    events = [e for e in events if "phase" not in e]
    assert len(result.val_names) == 1 and len(result.train_names) == 2
    assert events[0]["iteration"] == 0 and "object_f1" in events[0] and "loss" not in events[0]
    assert "object_f1" in events[-1]
    assert set(result.before) == set(result.after) >= {"pixel_dice", "object_f1", "object_f1_pooled"}
    assert read_config(result.entry.path).training["validation"]["object_f1"] == pytest.approx(result.after["object_f1"], abs=1e-4)


def test_region_masks_change_what_is_learned(base):
    samples = [synthetic_sample("a", 0)]
    everywhere = [np.ones((96, 96), bool)]
    corner = [np.zeros((96, 96), bool)]
    corner[0][:40, :40] = True
    settings = FinetuneSettings(**{**FAST, "iterations": 2})
    plain = finetune(str(base), samples, "plain", settings)
    full = finetune(str(base), samples, "full", settings, valid_masks=everywhere)
    part = finetune(str(base), samples, "part", settings, valid_masks=corner)
    a, b, c = (load_state(r.entry.path)[0] for r in (plain, full, part))
    floats = [k for k in a if a[k].is_floating_point()]
    assert all(torch.equal(a[k], b[k]) for k in floats)  # an all-True mask is no restriction
    assert any(not torch.equal(a[k], c[k]) for k in floats)
    assert read_config(part.entry.path).training["corrected_regions_only"] is True
    with pytest.raises(ValueError, match="one region mask per image"):
        finetune(str(base), samples, "bad", settings, valid_masks=[np.ones((10, 10), bool)])


def test_taken_name_fails_before_training(base):
    finetune(str(base), [synthetic_sample("a", 0)], "taken", FinetuneSettings(**{**FAST, "iterations": 1}))
    events = []
    with pytest.raises(ValueError, match="already exists"):
        finetune(str(base), [synthetic_sample("a", 0)], "taken", FinetuneSettings(**FAST), progress=events.append)
    assert events == []
    with pytest.raises(ValueError, match="No model named 'nope'"):
        finetune("nope", [synthetic_sample("a", 0)], "new", FinetuneSettings(**FAST))
    with pytest.raises(ValueError, match="Nothing to fine-tune"):
        finetune(str(base), [], "new", FinetuneSettings(**FAST))
    with pytest.raises(ValueError, match="validation share"):
        FinetuneSettings(val_fraction=1.5)


def test_a_finetune_never_replaces_its_base(base):
    first = finetune(str(base), [synthetic_sample("a", 0)], "mine", FinetuneSettings(**{**FAST, "iterations": 1}))
    before = digest(first.entry.path)
    with pytest.raises(ValueError, match="is the base model"):
        finetune("mine", [synthetic_sample("a", 0)], "mine", FinetuneSettings(**FAST), overwrite=True)
    assert digest(first.entry.path) == before
    finetune("mine", [synthetic_sample("a", 0)], "mine-2", FinetuneSettings(**{**FAST, "iterations": 1}))


def test_work_around_training_reports_progress_per_image(base):
    samples = [synthetic_sample(str(i), i) for i in range(3)]
    events = []
    finetune(str(base), samples, "phases", FinetuneSettings(**{**FAST, "calibrate": None}, layers="none",
                                                            val_fraction=0.34), progress=events.append)
    phases = [(e["phase"], e["done"], e["total"]) for e in events if "phase" in e]
    assert phases[0] == ("scoring the base model", 1, 1)
    assert ("choosing thresholds", 1, 2) in phases and ("choosing thresholds", 2, 2) in phases
    assert all("iteration" not in e and e["elapsed"] >= 0 for e in events if "phase" in e)


def test_replay_images_are_drawn_by_their_share_and_recorded(base):
    corrected = [synthetic_sample("new", 0)]
    replay = [synthetic_sample("old1", 1), synthetic_sample("old2", 2)]
    samples, masks, weights = finetune_module._with_replay(corrected, None, replay, 0.25)
    assert [s.name for s in samples] == ["new", "old1", "old2"] and masks is None
    assert weights == pytest.approx([0.75, 0.125, 0.125])
    region = [np.zeros((96, 96), bool)]
    _, masks, _ = finetune_module._with_replay(corrected, region, replay, 0.5)
    assert len(masks) == 3 and masks[1].all() and masks[2].all()  # replay labels hold everywhere
    assert finetune_module._with_replay(corrected, None, replay, 0.0)[2] is None

    settings = FinetuneSettings(**{**FAST, "iterations": 2}, layers="all")
    plain = finetune(str(base), corrected, "no-replay", settings)
    mixed = finetune(str(base), corrected, "replay", settings, replay=replay)
    a, b = load_state(plain.entry.path)[0], load_state(mixed.entry.path)[0]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    training = read_config(mixed.entry.path).training
    assert training["replay_images"] == ["old1", "old2"] and training["train_images"] == ["new"]
    unmixed = finetune(str(base), corrected, "replay-0", dataclasses.replace(settings, replay_share=0.0), replay=replay)
    assert read_config(unmixed.entry.path).training["replay_images"] == []  # a share of 0 mixes nothing in
    with pytest.raises(ValueError, match="replay share"):
        FinetuneSettings(replay_share=1.0)
    with pytest.raises(ValueError, match="optimizer"):
        FinetuneSettings(optimizer="amsgrad")


def test_sample_weights_decide_which_samples_are_drawn():
    labels = np.zeros((64, 64), np.int32)
    samples = [Sample("dark", np.full((64, 64, 3), 0.2, np.float32), labels),
               Sample("light", np.full((64, 64, 3), 0.8, np.float32), labels)]
    dataset = PatchDataset(samples, 32, (0.5,) * 3, (0.5,) * 3, augment=False, seed=0, sample_weights=[0, 1])
    assert all(torch.allclose(image, torch.tensor(0.6)) for image, _ in itertools.islice(iter(dataset), 10))
    both = PatchDataset(samples, 32, (0.5,) * 3, (0.5,) * 3, augment=False, seed=0, sample_weights=[1, 1])
    means = {round(float(image.mean()), 1) for image, _ in itertools.islice(iter(both), 20)}
    assert means == {-0.6, 0.6}
    with pytest.raises(ValueError, match="sample_weights"):
        PatchDataset(samples, 32, (0.5,) * 3, (0.5,) * 3, sample_weights=[0, 0])
    with pytest.raises(ValueError, match="sample_weights"):
        PatchDataset(samples, 32, (0.5,) * 3, (0.5,) * 3, sample_weights=[1])


def test_a_validation_share_needs_two_images(base):
    with pytest.raises(ValueError, match="at least 2 corrected images"):
        finetune(str(base), [synthetic_sample("a", 0)], "one", FinetuneSettings(**FAST, val_fraction=0.5))


def test_held_back_regions_are_scored_only_inside(monkeypatch):
    """A gland outside the corrected region is neither right nor wrong on a held-back image."""
    truth = np.zeros((96, 96), np.int32)
    truth[10:30, 10:30], truth[60:80, 60:80] = 1, 2
    region = np.zeros((96, 96), bool)
    region[:40, :40] = region[50:, 50:85] = True
    region[40:50, :] = False
    image = np.zeros((96, 96, 3), np.float32)
    samples = [Sample("a", image, truth), Sample("b", image, truth)]
    _, _, held, held_masks = finetune_module._split(samples, [region, region], 0.5, seed=0)
    assert held_masks[0].shape == held[0].labels.shape
    found = np.zeros((96, 96), np.int32)
    found[10:30, 10:30], found[60:80, 60:80], found[85:95, 5:15] = 1, 2, 3  # 3: outside the region

    class Found:
        labels = found[tuple(slice(0, n) for n in held[0].labels.shape)]

    monkeypatch.setattr(training_module, "segment", lambda model, image: Found)
    assert training_module.evaluate(None, held, held_masks)["object_f1_pooled"] == 1.0
    assert training_module.evaluate(None, held)["object_f1_pooled"] < 1.0  # unmasked, 3 counts as false


def test_stored_metrics_are_json_whatever_the_scores():
    stored = training_module.rounded_metrics({"object_f1": 0.123456, "object_hausdorff": float("inf")})
    assert stored == {"object_f1": 0.1235, "object_hausdorff": None}


def test_crops_land_on_small_corrected_regions():
    """Crops of a large image with a small corrected region hold corrected pixels, so batches teach."""
    big = disc_sample("big", 0, 400, count=8, margin=20, radii=(6, 12))
    region = np.zeros((400, 400), bool)
    region[300:340, 30:70] = True
    dataset = PatchDataset([big], 64, (0.5,) * 3, (0.5,) * 3, augment=True, seed=0, valid_masks=[region])
    crops = [target for _, target in itertools.islice(iter(dataset), 40)]
    assert all((target >= 0).any() for target in crops)


@pytest.mark.parametrize("when", [2, 6])
def test_cancel_leaves_no_model_and_no_run_folder(base, when):
    """Cancel mid-run (iteration 2) or after the last step but before saving (iteration 6)."""
    before, folders = digest(base), run_dirs()
    cancel = threading.Event()

    def progress(event):
        if event["iteration"] >= when:
            cancel.set()

    settings = FinetuneSettings(**{**FAST, "iterations": 6})
    with pytest.raises(Cancelled):
        finetune(str(base), [synthetic_sample("a", 0)], "cancelled", settings, progress=progress, cancel=cancel)
    assert store_files() == []
    assert run_dirs() == folders
    assert digest(base) == before


def _live_objects() -> tuple[int, int]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch module proxies warns
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        return (sum(isinstance(o, torch.nn.Module) for o in objects),
                sum(isinstance(o, torch.Tensor) for o in objects))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_repeated_finetunes_do_not_accumulate_memory(base):
    samples = [synthetic_sample("a", 0)]
    settings = FinetuneSettings(**{**FAST, "iterations": 2})
    finetune(str(base), samples, "warmup", settings)  # first run: imports, allocator pools
    modules, tensors = _live_objects()
    rss = _rss_mb()
    for i in range(6):
        result = finetune(str(base), samples, f"run{i}", settings)
        del result
    assert _live_objects() == (modules, tensors)  # no network, optimizer or batch survives a run
    assert _rss_mb() - rss < 60  # and the process does not grow run after run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_is_released_after_a_run(base):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    finetune(str(base), [synthetic_sample("a", 0)], "gpu", FinetuneSettings(**{**FAST, "device": "cuda"}))
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert torch.cuda.memory_reserved() == 0 or torch.cuda.memory_reserved() <= before + 2**20


def test_store_write_failure_is_reported_after_training(base, monkeypatch):
    import errno

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_store, "save_file", full)
    with pytest.raises(model_store.ModelStoreError, match="is full"):
        finetune(str(base), [synthetic_sample("a", 0)], "nospace", FinetuneSettings(**{**FAST, "iterations": 1}))
    assert store_files() == []


def test_module_has_no_qt():
    source = Path(finetune_module.__file__).read_text() + Path(model_store.__file__).read_text()
    for forbidden in ("qtpy", "PyQt", "import napari", "from napari", "magicgui"):
        assert forbidden not in source


def test_default_model_finetunes_on_the_sample_and_keeps_working():
    """The bundled model, two steps on the packaged sample: a loadable user model that segments."""
    from glas_seg._sample_data import SAMPLE_DIR
    from glas_seg.backend.data import load_sample
    from glas_seg.backend.registry import DEFAULT_MODEL, find_model

    assert find_model(DEFAULT_MODEL).source == "bundled"
    sample = load_sample("glas_train_12", SAMPLE_DIR / "glas_train_12.png", SAMPLE_DIR / "glas_train_12_anno.png")
    result = finetune(DEFAULT_MODEL, [sample], "default-ft", FinetuneSettings(iterations=2, device="cpu"))
    assert result.entry.config.base_model == DEFAULT_MODEL
    labels = segment(load_model("default-ft", "cpu"), sample.image).labels
    assert labels.shape == sample.labels.shape and labels.max() > 3
