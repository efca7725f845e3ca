"""Every model shipped in the package: documented, loadable, and as good as its file says.

The validation test re-segments the validation images each model recorded at training time
(the patient-wise split of its own run) and checks that the shipped float16 weights give the
numbers stored in the file and written in docs/models.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glas_seg.backend.data import dataset_split, load_sample
from glas_seg.backend.image_io import read_image
from glas_seg.backend.inference import segment
from glas_seg.backend.models import ARCHITECTURES
from glas_seg.backend.registry import BUNDLED_DIR, list_models, load_model
from glas_seg.backend.training import evaluate

from conftest import REPO

BUNDLED = [e for e in list_models() if e.source == "bundled"]
NAMES = [e.name for e in BUNDLED]
SAMPLE = REPO / "src" / "glas_seg" / "sample_data" / "glas_train_12.png"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_architecture_ships_gland_weights_and_two_ship_nucleus_weights():
    shipped = {(e.config.architecture, e.config.task) for e in BUNDLED}
    assert {(a, "glands") for a in ARCHITECTURES} <= shipped
    assert {("unet_plus_plus", "nuclei"), ("kidney_segnet", "nuclei")} <= shipped


def test_shipped_weights_stay_small():
    sizes = {p.name: p.stat().st_size for p in BUNDLED_DIR.glob("*.safetensors")}
    assert sum(sizes.values()) < 50e6, sizes


@pytest.mark.parametrize("name", NAMES)
def test_model_records_its_training(name):
    config = next(e for e in BUNDLED if e.name == name).config
    record = config.training
    for key in ("data", "split", "iterations", "batch_size", "crop_size", "wall_seconds", "device", "val_names"):
        assert key in record, key
    assert {"object_f1", "pixel_dice"} <= set(record["validation"])
    assert name in (REPO / "docs" / "models.md").read_text()


@pytest.mark.parametrize("name", NAMES)
def test_model_segments_the_sample_image(name):
    model = load_model(name, "cpu")
    result = segment(model, read_image(SAMPLE))
    assert result.labels.shape == (433, 574) and result.labels.dtype == np.int32
    assert result.labels.max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_model_reproduces_its_validation_numbers(name, shared_data):
    model = load_model(name, "cpu")
    record = model.config.training
    root = shared_data / ("glas" if model.config.task == "glands" else "monuseg")
    _, val_pairs = dataset_split(root)
    assert [p[0] for p in val_pairs] == record["val_names"]
    measured = evaluate(model, [load_sample(*p) for p in val_pairs])
    expected = record["validation"]
    # float16 weights and another thread count move the numbers slightly, never by much.
    assert measured["object_f1"] >= expected["object_f1"] - 0.02, (measured, expected)
    assert measured["pixel_dice"] >= expected["pixel_dice"] - 0.02, (measured, expected)
