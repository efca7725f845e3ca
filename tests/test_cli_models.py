"""`glas-seg models` and `glas-seg finetune`, and segmenting with a fine-tuned model by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from skimage.io import imsave

from glas_seg.backend import model_store, registry
from glas_seg.backend.checkpoint import ModelConfig, read_config, save_model
from glas_seg.backend.registry import build_model, user_model_dir
from glas_seg.cli import main


def make_model(path: Path, task: str = "glands", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = ModelConfig(name=path.stem, architecture="unet", arch_kwargs={"width": 4, "depth": 2}, task=task,
                         tile_size=64, min_size=10)
    return save_model(path, build_model(config), config)


@pytest.fixture
def bundled(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "weights"
    make_model(folder / "bundled-glands.safetensors")
    monkeypatch.setattr(registry, "BUNDLED_DIR", folder)
    monkeypatch.setattr(model_store, "BUNDLED_DIR", folder)
    return folder


def write_pairs(folder: Path, names: list[str], layout: str) -> None:
    """Synthetic H&E-like images with disc 'glands': GlaS layout or images/ + labels/."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:80, :80]
    for name in names:
        labels = np.zeros((80, 80), np.uint8)
        for i in range(1, 4):
            cy, cx = rng.integers(15, 65, 2)
            labels[((yy - cy) ** 2 + (xx - cx) ** 2 < 100) & (labels == 0)] = i
        image = np.where(labels[..., None] > 0, [120, 70, 150], [230, 180, 200]).astype(np.uint8)
        if layout == "glas":
            folder.mkdir(parents=True, exist_ok=True)
            imsave(folder / f"{name}.bmp", image)
            imsave(folder / f"{name}_anno.bmp", labels, check_contrast=False)
        else:
            (folder / "images").mkdir(parents=True, exist_ok=True)
            (folder / "labels").mkdir(parents=True, exist_ok=True)
            imsave(folder / "images" / f"{name}.png", image)
            tifffile.imwrite(folder / "labels" / f"{name}.tif", labels.astype(np.int32))


def test_models_json_lists_bundled_and_user_models(bundled, tmp_path, capsys):
    model_store.import_model(make_model(tmp_path / "nuc.safetensors", task="nuclei"), name="my-nuclei")
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["source"], m["task"], m["architecture"]) for m in listed] == [
        ("bundled-glands", "bundled", "glands", "unet"), ("my-nuclei", "user", "nuclei", "unet")]
    assert main(["models", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == listed
    assert main(["models"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["bundled-glands", "bundled", "glands"]
    assert table[1].split()[:3] == ["my-nuclei", "user", "nuclei"]


def test_models_export_import_rename_delete(bundled, tmp_path, capsys):
    assert main(["models", "export", "bundled-glands", str(tmp_path / "copy.safetensors")]) == 0
    assert main(["models", "import", str(tmp_path / "copy.safetensors"), "--name", "mine"]) == 0
    assert main(["models", "rename", "mine", "yours"]) == 0
    assert read_config(user_model_dir() / "yours.safetensors").name == "yours"
    assert main(["models", "delete", "bundled-glands"]) == 2
    assert "only user models" in capsys.readouterr().err
    assert main(["models", "delete", "yours"]) == 0
    assert list(user_model_dir().glob("*")) == []


def test_models_import_refuses_corrupt_files(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["models", "import", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glas-seg: error: Refused") and "Traceback" not in err
    assert not user_model_dir().exists() or list(user_model_dir().glob("*")) == []


@pytest.mark.parametrize("layout", ["glas", "folders"])
def test_finetune_cli_then_segment_with_the_new_model_by_name(bundled, tmp_path, layout, capsys):
    data = tmp_path / "data"
    write_pairs(data, ["a", "b"], layout)
    folders = [str(data)] if layout == "glas" else [str(data / "images"), str(data / "labels")]
    argv = ["finetune", *folders, "--base", "bundled-glands", "--name", "clinic-a", "--iterations", "2",
            "--batch-size", "2", "--crop-size", "32", "--device", "cpu"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "2 image/label pair(s): a, b" in err and "saved user model 'clinic-a'" in err
    config = read_config(user_model_dir() / "clinic-a.safetensors")
    assert config.base_model == "bundled-glands" and config.training["iterations"] == 2
    assert main(argv) == 2  # the name is now taken
    assert "already exists" in capsys.readouterr().err

    image = data / "a.bmp" if layout == "glas" else data / "images" / "a.png"
    out = tmp_path / "out"
    assert main(["segment", str(image), "--out", str(out), "--model", "clinic-a", "--device", "cpu"]) == 0
    labels = tifffile.imread(out / "a_labels.tif")
    assert labels.shape == (80, 80)


def test_finetune_cli_mixes_in_replay_pairs(bundled, tmp_path, capsys):
    write_pairs(tmp_path / "new", ["a"], "glas")
    write_pairs(tmp_path / "old", ["b", "c"], "glas")
    assert main(["finetune", str(tmp_path / "new"), "--base", "bundled-glands", "--name", "with-replay",
                 "--iterations", "2", "--batch-size", "2", "--crop-size", "32", "--device", "cpu", "--layers", "all",
                 "--replay", str(tmp_path / "old"), "--replay-share", "0.3", "--optimizer", "sgd"]) == 0
    assert "2 replay pair(s)" in capsys.readouterr().err
    training = read_config(user_model_dir() / "with-replay.safetensors").training
    assert training["replay_images"] == ["b", "c"] and training["train_images"] == ["a"]
    assert training["settings"]["replay_share"] == 0.3 and training["settings"]["optimizer"] == "sgd"


def test_finetune_cli_reports_missing_pairs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["finetune", str(tmp_path / "empty"), "--name", "x"]) == 2
    assert "No image/label pairs" in capsys.readouterr().err
