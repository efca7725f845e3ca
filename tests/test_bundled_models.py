"""Every model shipped in the package: documented, loadable, and as good as its file says.

Re-validating every model on all its validation images took over half of the test suite, so
each model gets one fast real-data check instead: it segments the top-left crop (:data:`CROP`:
512 px for glands, 256 px of the 40x nucleus images) of the first :data:`N_IMAGES` images of its
recorded validation split and must give the per-image numbers
cached in ``bundled_model_checks.json``. The cache was computed by this module's own
:func:`measure` (same code, float32 pipeline) and holds each file's SHA-256, so a retrained
model asks for a refresh instead of failing on numbers. After retraining a model or changing
post-processing on purpose, refresh it (and look at the diff)::

    OMP_NUM_THREADS=1 python tests/test_bundled_models.py [NAME ...]

The full validation numbers are measured by ``benchmarks/bench_models.py`` (docs/models.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from glas_seg.backend.checkpoint import file_sha256
from glas_seg.backend.registry import BUNDLED_DIR, list_models, load_model

REPO = Path(__file__).resolve().parents[1]
CHECKS = Path(__file__).with_name("bundled_model_checks.json")
BUNDLED = [e for e in list_models() if e.source == "bundled"]
NAMES = [e.name for e in BUNDLED]
N_IMAGES = 3
CROP = {"glands": 512, "nuclei": 256}
# Another thread count or BLAS changes float sums in the last bits; on a crop that may move one
# watershed seed or detection (one object more or less, or one match), never more than this.
TOLERANCE = {"tp": 1, "fp": 1, "fn": 1, "pixel_dice": 0.01, "object_dice": 0.03}


def check_pairs(entry, data_root: Path) -> list[tuple[str, Path, Path]]:
    """The first images of the model's recorded validation split (image/label path triples)."""
    from glas_seg.backend.data import find_pairs

    folder = data_root / ("glas" if entry.config.task == "glands" else "monuseg") / "train"
    by_name = {p[0]: p for p in find_pairs(folder)}
    return [by_name[name] for name in entry.config.training["val_names"][:N_IMAGES]]


def measure(entry, data_root: Path) -> dict:
    """Per image: the model's object TP / FP / FN, object F1 and Dice and pixel Dice on its check crop."""
    from glas_seg.backend.data import load_sample
    from glas_seg.backend.inference import segment
    from glas_seg.backend.metrics import match_stack, object_scores, pixel_dice

    model = load_model(entry.path, "cpu")
    crop = CROP[entry.config.task]
    images = {}
    for pair in check_pairs(entry, data_root):
        sample = load_sample(*pair)
        image, truth = sample.image[:crop, :crop], sample.labels[:crop, :crop]
        labels = segment(model, image).labels
        assert labels.shape == truth.shape and labels.dtype == np.int32
        scores = object_scores(match_stack(labels, truth))
        images[pair[0]] = {**{k: int(scores[k]) for k in ("tp", "fp", "fn")},
                           **{k: round(float(scores[k]), 4) for k in ("object_f1", "object_dice")},
                           "pixel_dice": round(pixel_dice(labels, truth), 4)}
    return {"sha256": file_sha256(entry.path), "crop": crop, "images": images}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_architecture_ships_gland_weights_and_two_ship_nucleus_weights():
    from glas_seg.backend.models import ARCHITECTURES

    shipped = {(e.config.architecture, e.config.task) for e in BUNDLED}
    assert {(a, "glands") for a in ARCHITECTURES} <= shipped
    assert {("unet_plus_plus", "nuclei"), ("kidney_segnet", "nuclei")} <= shipped


def test_shipped_weights_stay_small():
    sizes = {p.name: p.stat().st_size for p in BUNDLED_DIR.glob("*.safetensors")}
    assert sum(sizes.values()) < 50e6, sizes


@pytest.mark.parametrize("name", NAMES)
def test_model_records_its_training(name):
    from glas_seg.backend.registry import format_validation_score

    config = next(e for e in BUNDLED if e.name == name).config
    record = config.training
    for key in ("data", "split", "iterations", "batch_size", "crop_size", "wall_seconds", "device", "val_names"):
        assert key in record, key
    assert {"object_f1", "pixel_dice", "object_f1_pooled"} <= set(record["validation"])
    # One number everywhere: the docs table row shows what `glas-seg models` shows.
    row = next(line for line in (REPO / "docs" / "models.md").read_text().splitlines() if line.startswith(f"| `{name}`"))
    assert f"| {format_validation_score(config).split()[-1]} / " in row, row


@pytest.mark.parametrize("name", NAMES)
def test_model_reproduces_its_cached_numbers_on_real_data(name, shared_data):
    entry = next(e for e in BUNDLED if e.name == name)
    cached = json.loads(CHECKS.read_text()).get(name)
    assert cached is not None, f"no cached check for {name}: run python tests/test_bundled_models.py {name}"
    assert cached["sha256"] == file_sha256(entry.path), (
        f"{name}.safetensors changed since its check was cached: run python tests/test_bundled_models.py {name}")
    measured = measure(entry, shared_data)
    assert list(measured["images"]) == list(cached["images"])
    for image, expected in cached["images"].items():
        got = measured["images"][image]
        for key, tolerance in TOLERANCE.items():
            assert abs(got[key] - expected[key]) <= tolerance, (name, image, key, got, expected)


if __name__ == "__main__":  # refresh the cache: python tests/test_bundled_models.py [NAME ...]
    import torch

    torch.set_num_threads(1)
    data = REPO.parent / "shared" / "data"
    checks = json.loads(CHECKS.read_text()) if CHECKS.exists() else {}
    for entry in BUNDLED:
        if len(sys.argv) == 1 or entry.name in sys.argv[1:]:
            checks[entry.name] = measure(entry, data)
            print(entry.name, checks[entry.name]["images"])
    checks = {name: checks[name] for name in sorted(checks) if name in NAMES}
    CHECKS.write_text(json.dumps(checks, indent=1) + "\n")
