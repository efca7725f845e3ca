"""Issue 17: bad or unusual input gets a correct result or one clear line, never a traceback,
a silently wrong result or lost output. One test (or a few) per numbered case of the issue;
command-line cases go through the command line."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from _bad_input import (assert_one_line_error, cli, edited_model, glands_image, store_files, tiny_model,
                        tiny_tensors, tree, write_image, write_pairs)
from glas_seg.backend import model_store
from glas_seg.backend.data import Sample
from glas_seg.backend.errors import GlasSegError
from glas_seg.backend.finetune import FinetuneSettings, finetune
from glas_seg.backend.image_io import read_image
from glas_seg.backend.inference import segment
from glas_seg.backend.metrics import pixel_dice
from glas_seg.backend.registry import load_model, user_model_dir
from glas_seg.cli import main


@pytest.fixture
def model(tmp_path):
    return tiny_model(tmp_path / "models" / "tiny.safetensors")


@pytest.fixture
def image(tmp_path):
    return write_image(tmp_path / "in" / "a.png")


TRAIN = ["--model", "unet", "--arch-kwargs", '{"width": 4, "depth": 2}', "--scale", "1", "--tile-size", "64",
         "--min-size", "10", "--crop-size", "32", "--batch-size", "1", "--eval-every", "1", "--device", "cpu"]


# 1 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, fragment", [("mps", "MPS"), ("foo", "Unknown device 'foo'"),
                                              ("meta", "Unsupported device"), ("cuda:99", "cuda:99")])
def test_01_unknown_or_absent_device_is_named_with_the_devices_here(capsys, tmp_path, model, image, device, fragment):
    code, err = cli(capsys, "segment", image, "--out", tmp_path / "out", "--model", model, "--device", device)
    assert_one_line_error(code, err, fragment, "devices on this machine: auto, cpu")
    assert not (tmp_path / "out").exists()
    code, err = cli(capsys, "train", "--data", tmp_path, "--out", tmp_path / "run", "--device", device, *TRAIN[:-2])
    assert_one_line_error(code, err, "devices on this machine")


# 2 -------------------------------------------------------------------------------------------
def test_02_out_that_is_a_file_or_under_a_file(capsys, tmp_path, model, image):
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a file")
    for out, fragment in ((blocker, "is a file"), (blocker / "sub", "which is a file")):
        code, err = cli(capsys, "segment", image, "--out", out, "--model", model)
        assert_one_line_error(code, err, "--out", fragment)
        code, err = cli(capsys, "train", "--data", tmp_path, "--out", out, *TRAIN)
        assert_one_line_error(code, err, "--out", fragment)
    assert blocker.read_text() == "a file"


# 3 -------------------------------------------------------------------------------------------
def test_03_unwritable_output_folder_is_refused_before_any_work(capsys, tmp_path, model, image, monkeypatch):
    """Root ignores permission bits and immutable folders need root to make: the folder's refusal
    to create a file is simulated where every writer meets it, at file creation."""
    import tempfile

    out = tmp_path / "out"
    out.mkdir()
    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and str(dir) == str(out):
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, err = cli(capsys, "segment", image, "--out", out, "--model", model)
    assert_one_line_error(code, err, "cannot write into --out", "Permission denied")
    code, err = cli(capsys, "evaluate", tmp_path, tmp_path, "--csv", out / "scores.csv")
    assert_one_line_error(code, err, "Permission denied")
    assert tree(out) == []


def test_03_a_write_that_fails_mid_batch_skips_that_image_only(capsys, tmp_path, model, monkeypatch):
    images = [write_image(tmp_path / "in" / f"{name}.png", seed) for seed, name in enumerate("abc")]
    real = tifffile.imwrite
    calls = []

    def fail_once(file, *args, **kwargs):
        calls.append(file)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", fail_once)
    code, err = cli(capsys, "segment", *images, "--out", tmp_path / "out", "--model", model)
    assert code == 1 and "Traceback" not in err
    assert "skipped" in err and "a.png" in err and "Permission denied" in err
    assert tree(tmp_path / "out") == ["b_labels.tif", "c_labels.tif"]  # and no temporary file left


# 4 -------------------------------------------------------------------------------------------
def test_04_a_folder_where_a_label_file_goes_skips_that_image_only(capsys, tmp_path, model):
    images = [write_image(tmp_path / "in" / f"{name}.png", seed) for seed, name in enumerate("ab")]
    (tmp_path / "out" / "a_labels.tif").mkdir(parents=True)
    code, err = cli(capsys, "segment", *images, "--out", tmp_path / "out", "--model", model)
    assert code == 1 and "Traceback" not in err
    assert "a folder of that name is in the way" in err
    assert (tmp_path / "out" / "a_labels.tif").is_dir()
    assert tifffile.imread(tmp_path / "out" / "b_labels.tif").shape == (64, 64)


# 5 -------------------------------------------------------------------------------------------
def test_05_evaluate_report_paths_are_checked_before_scoring(capsys, tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    labels = glands_image()[1]
    tifffile.imwrite(tmp_path / "pred" / "x_labels.tif", labels)
    tifffile.imwrite(tmp_path / "gt" / "x.tif", labels)
    (tmp_path / "folder.csv").mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    for option, path, fragment in (("--csv", tmp_path / "folder.csv", "is a folder"),
                                   ("--json", blocker / "scores.json", "which is a file")):
        code, err = cli(capsys, "evaluate", tmp_path / "pred", tmp_path / "gt", option, path)
        assert_one_line_error(code, err, option, fragment)
    code, err = cli(capsys, "evaluate", tmp_path / "pred", tmp_path / "gt", "--csv", tmp_path / "r" / "s.csv")
    assert code == 0 and (tmp_path / "r" / "s.csv").read_text().startswith("image,")


# 6 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, fragment", [
    ("[1]", "must be a JSON object"), ('{"bogus": 1}', "bogus"), ("{width: 4}", "not valid JSON"),
    ('{"width": -3}', "cannot be built"), ('{"width": "wide"}', "unet"),
])
def test_06_bad_arch_kwargs(capsys, tmp_path, kwargs, fragment):
    code, err = cli(capsys, "train", "--data", tmp_path, "--out", tmp_path / "run", "--model", "unet",
                    "--arch-kwargs", kwargs, "--device", "cpu")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


# 7 -------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs code; a weights-only loader must refuse it."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_07_resuming_from_a_damaged_optimizer_state_says_what_to_do(capsys, tmp_path, one_torch_thread):
    data = write_pairs(tmp_path / "data")
    run = tmp_path / "run"
    code, err = cli(capsys, "train", "--data", data, "--out", run, "--iterations", "1", *TRAIN)
    assert code == 0, err
    _Payload.marker = str(tmp_path / "CODE_RAN")
    (run / "last_optimizer.pt").write_bytes(pickle.dumps({"optimizer": _Payload()}))
    code, err = cli(capsys, "train", "--data", data, "--out", run, "--iterations", "2", *TRAIN)
    assert_one_line_error(code, err, f"run folder {run} cannot be resumed", "another --out", f"delete {run}")
    assert not (tmp_path / "CODE_RAN").exists()


# 8 -------------------------------------------------------------------------------------------
def test_08_two_inputs_with_the_same_stem_are_refused(capsys, tmp_path, model):
    first, second = write_image(tmp_path / "a" / "same.bmp", 0), write_image(tmp_path / "b" / "same.png", 1)
    code, err = cli(capsys, "segment", first, second, "--out", tmp_path / "out", "--model", model)
    assert_one_line_error(code, err, "same_labels.tif", "different --out folders")
    assert tree(tmp_path / "out") == []
    # the same file twice is no conflict: it is segmented once
    code, err = cli(capsys, "segment", first, first, "--out", tmp_path / "out", "--model", model)
    assert code == 0 and tree(tmp_path / "out") == ["same_labels.tif"]


# 9 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value", [("--tile-size", "-64"), ("--tile-size", "0"), ("--overlap", "0.95"),
                                           ("--min-size", "-1")])
def test_09_bad_tile_options_via_cli(capsys, tmp_path, model, image, option, value):
    code, err = cli(capsys, "segment", image, "--out", tmp_path / "out", "--model", model, option, value)
    assert_one_line_error(code, err, value.lstrip("-") if value != "0" else "got 0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs", [{"batch_size": -1}, {"batch_size": 0}, {"batch_size": 1.5},
                                    {"tile_size": -64}, {"tile_size": 0}, {"tile_size": True}, {"min_size": -5}])
def test_09_bad_tile_options_via_api(model, kwargs):
    loaded = load_model(model, "cpu")
    with pytest.raises(GlasSegError):
        segment(loaded, glands_image()[0], **kwargs)


# 10 ------------------------------------------------------------------------------------------
def test_10_cmyk_jpeg_is_converted_as_declared(capsys, tmp_path, model):
    rgb = glands_image()[0]
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as cmyk:
        assert cmyk.mode == "CMYK"
        expected = np.asarray(cmyk.convert("RGB"))
    Image.fromarray(expected).save(tmp_path / "rgb.png")
    pixels = read_image(tmp_path / "cmyk.jpg")
    assert pixels.shape == (64, 64, 3) and np.array_equal(pixels, expected)
    assert np.abs(pixels.astype(int) - rgb).max() < 16  # close to the original RGB (JPEG loss)
    code, err = cli(capsys, "segment", tmp_path / "cmyk.jpg", tmp_path / "rgb.png", "--out", tmp_path / "out",
                    "--model", model)
    assert code == 0, err
    assert np.array_equal(tifffile.imread(tmp_path / "out" / "cmyk_labels.tif"),
                          tifffile.imread(tmp_path / "out" / "rgb_labels.tif"))


def test_10_cmyk_tiff_is_converted_too(tmp_path):
    rgb = glands_image()[0]
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    assert np.abs(read_image(tmp_path / "cmyk.tif").astype(int) - rgb).max() <= 1


# 11 ------------------------------------------------------------------------------------------
def test_11_pixel_dice_refuses_negative_ids_like_the_object_metrics():
    labels = glands_image()[1]
    with pytest.raises(GlasSegError, match="negative"):
        pixel_dice(-labels, labels)
    with pytest.raises(GlasSegError, match="negative"):
        pixel_dice(labels, -labels)


# 12 ------------------------------------------------------------------------------------------
def test_12_finetune_on_negative_ids_is_refused(capsys, tmp_path, model):
    folder = tmp_path / "pairs"
    image, labels = glands_image()
    folder.mkdir()
    Image.fromarray(image).save(folder / "a.png")
    tifffile.imwrite(folder / "a_label.tif", -labels)
    code, err = cli(capsys, "finetune", folder, "--base", model, "--name", "neg", "--iterations", "1",
                    "--batch-size", "1", "--crop-size", "32", "--device", "cpu")
    assert_one_line_error(code, err, "a_label.tif", "label ids must be 0 (background) or positive")
    assert store_files() == []
    # the API (the Fine-tune widget's path) refuses arrays the same way
    with pytest.raises(GlasSegError, match="label ids"):
        finetune(str(model), [Sample("a", image / 255.0, -labels)], "neg",
                 FinetuneSettings(iterations=1, batch_size=1, crop_size=32, device="cpu"))
    assert store_files() == []


# 13 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value, fragment", [
    ("--iterations", "0", "iterations must be at least 1"), ("--scale", "0", "scale 0.0 is out of range"),
    ("--scale", "100", "scale"), ("--tile-size", "-1", "tile_size"), ("--batch-size", "0", "batch size"),
    ("--lr", "0", "learning rate"), ("--crop-size", "4", "crop size"),
])
def test_13_train_settings_that_cannot_train_are_refused(capsys, tmp_path, option, value, fragment):
    argv = [*TRAIN, option, value] if option not in TRAIN else [*TRAIN[: TRAIN.index(option)], option, value,
                                                               *TRAIN[TRAIN.index(option) + 2:]]
    code, err = cli(capsys, "train", "--data", tmp_path / "data", "--out", tmp_path / "run", *argv)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


# 14-17: model files that passed import, then broke things -------------------------------------
BAD_CONFIGS = {
    # case: (changes to the stored configuration, or its raw JSON text; fragment of the message)
    "14 config is a JSON string": ('"unet"', "a JSON str, not an object"),
    "14 config is not JSON": ("{scale: 1", "not JSON"),
    "14 scale is a list": ({"scale": [0.5]}, "scale must be a number, not list"),
    "15 training is a string": ({"training": "long"}, "training must be an object, not str"),
    "15 training is a list": ({"training": [1, 2]}, "training must be an object, not list"),
    "16 mean has 2 values": ({"mean": [0.5, 0.5]}, "mean must be 3 numbers"),
    "16 four class names": ({"class_names": ["a", "b", "c", "d"]}, "class_names must name 3 classes"),
    "17 std is zero": ({"std": [0, 0, 0]}, "std must be greater than 0"),
    "17 scale is tiny": ({"scale": 1e-6}, "scale 1e-06 is out of range"),
    "architecture is unknown": ({"architecture": "resnet"}, "cannot build architecture 'resnet'"),
    "targets is unknown": ({"targets": "middle"}, "unknown targets 'middle'"),
    "tile_size is a float": ({"tile_size": 64.5}, "tile_size must be an integer"),
    "min_size is negative": ({"min_size": -1}, "min_size -1 must be 0 or more"),
    "task is unknown": ({"task": "cats"}, "unknown task 'cats'"),
    "arch_kwargs is a list": ({"arch_kwargs": [4]}, "arch_kwargs must be an object"),
    "name is missing": ({"name": None}, "name must be a string"),
    "newer format": ({"format_version": 99}, "update glas-seg"),
}


def _bad_file(path, case):
    changes, _ = BAD_CONFIGS[case]
    return edited_model(path, config_text=changes) if isinstance(changes, str) else edited_model(path, **changes)


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_14_to_17_invalid_configuration_is_refused_on_import(capsys, tmp_path, case):
    path = _bad_file(tmp_path / "bad.safetensors", case)
    code, err = cli(capsys, "models", "import", path)
    assert_one_line_error(code, err, "Refused", BAD_CONFIGS[case][1])
    assert store_files() == []


def test_14_to_17_all_faults_of_a_file_in_one_message(tmp_path):
    path = edited_model(tmp_path / "bad.safetensors", mean=[1], std=[0, 0, 0], scale="big", class_names=["x"])
    with pytest.raises(GlasSegError) as info:
        model_store.import_model(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("mean must be 3 numbers", "std must be greater than 0", "scale must be a number",
                     "class_names must name 3 classes"):
        assert fragment in message


def test_17_integer_weights_are_refused_on_import(capsys, tmp_path):
    tensors = {k: v.to(torch.int32) if v.is_floating_point() else v for k, v in tiny_tensors().items()}
    path = edited_model(tmp_path / "ints.safetensors", tensors=tensors)
    code, err = cli(capsys, "models", "import", path)
    assert_one_line_error(code, err, "Refused", "wrong dtype")
    assert store_files() == []


@pytest.mark.parametrize("case", ["14 config is a JSON string", "14 scale is a list", "15 training is a string",
                                  "15 training is a list", "16 mean has 2 values", "17 std is zero"])
def test_14_to_17_a_damaged_file_in_the_store_breaks_nothing_else(capsys, tmp_path, image, case):
    """Copied into the store by hand: listed as damaged, other models (the default one included)
    keep working, using it by name gives its fault, and it can be deleted."""
    _bad_file(user_model_dir() / "broken.safetensors", case)
    tiny_model(user_model_dir() / "fine.safetensors")

    capsys.readouterr()
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "fine" in table and "unet-glands" in table
    broken = [line for line in table.splitlines() if line.startswith("broken")]
    assert len(broken) == 1 and "damaged" in broken[0]
    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["broken"]["damaged"] and listed["fine"]["damaged"] is None

    code, err = cli(capsys, "segment", image, "--out", tmp_path / "out", "--device", "cpu")  # the default model
    assert code == 0, err
    code, err = cli(capsys, "segment", image, "--out", tmp_path / "out", "--model", "fine")
    assert code == 0, err
    code, err = cli(capsys, "segment", image, "--out", tmp_path / "out2", "--model", "broken")
    assert_one_line_error(code, err, "'broken' is damaged", "models delete")
    code, err = cli(capsys, "models", "rename", "broken", "other")
    assert_one_line_error(code, err, "damaged and can only be deleted")

    code, err = cli(capsys, "models", "delete", "broken")
    assert code == 0, err
    assert store_files() == ["fine.safetensors"]


def test_17_weights_damaged_after_import_are_refused_on_load(capsys, tmp_path, image):
    """Header fine, tensors not (integer or NaN): listed normally, refused when loaded."""
    tensors = {k: v.to(torch.int32) if v.is_floating_point() else v for k, v in tiny_tensors().items()}
    edited_model(user_model_dir() / "ints.safetensors", tensors=tensors)
    poisoned = tiny_tensors()
    key = next(k for k, v in poisoned.items() if v.is_floating_point() and v.numel() > 1)
    poisoned[key] = poisoned[key].clone().fill_(float("nan"))
    edited_model(user_model_dir() / "nan.safetensors", tensors=poisoned)
    for name, fragment in (("ints", "wrong dtype"), ("nan", "NaN or infinite")):
        code, err = cli(capsys, "segment", image, "--out", tmp_path / "out", "--model", name)
        assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists() or tree(tmp_path / "out") == []


# Also worth fixing: overwriting told, label files written atomically ----------------------------
def test_segment_says_when_it_replaces_a_label_file(capsys, tmp_path, model, image):
    code, err = cli(capsys, "segment", image, "--out", tmp_path / "out", "--model", model)
    assert code == 0 and "replaced" not in err
    # The same command again: the manifest says it is done, nothing is rewritten.
    code, err = cli(capsys, "segment", image, "--out", tmp_path / "out", "--model", model)
    assert code == 0 and "replaced" not in err and "1 already done" in err
    # Other settings: done again, and the overwrite is told.
    code, err = cli(capsys, "segment", image, "--out", tmp_path / "out", "--model", model, "--min-size", "5")
    assert code == 0 and f"replaced existing {tmp_path / 'out' / 'a_labels.tif'}" in err


def test_label_files_are_written_under_a_temporary_name(capsys, tmp_path, model, image, monkeypatch):
    """A write that dies half-way leaves neither a truncated label file nor its temporary file."""
    (tmp_path / "out").mkdir()
    previous = tmp_path / "out" / "a_labels.tif"
    tifffile.imwrite(previous, np.ones((64, 64), np.int32))
    real = tifffile.imwrite

    def die_half_way(file, data, **kwargs):
        real(file, data[:10], **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", die_half_way)
    code, err = cli(capsys, "segment", image, "--out", tmp_path / "out", "--model", model)
    assert code == 1 and "No space left on device" in err
    assert tree(tmp_path / "out") == ["a_labels.tif"]
    assert tifffile.imread(previous).shape == (64, 64)  # the previous result is intact
