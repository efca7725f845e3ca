"""The bundled default model on the GlaS images it was validated on (patient-wise split)."""

import numpy as np

from glas_seg.backend.data import glas_split, load_sample
from glas_seg.backend.metrics import f1_from_counts, object_detection_counts, pixel_dice
from glas_seg.backend.inference import segment
from glas_seg.backend.registry import find_model, load_model


def test_default_model_on_glas_validation_split(shared_data):
    model = load_model("unet-glands", "cpu")
    _, val_pairs = glas_split(shared_data / "glas")
    # The split used here is the one recorded in the model at training time.
    assert [p[0] for p in val_pairs] == find_model("unet-glands").config.training["val_names"]
    dices, f1s = [], []
    for pair in val_pairs:
        sample = load_sample(*pair)
        labels = segment(model, sample.image).labels
        dices.append(pixel_dice(labels, sample.labels))
        f1s.append(f1_from_counts(**object_detection_counts(labels, sample.labels)))
    assert np.mean(dices) >= 0.80, f"mean pixel Dice {np.mean(dices):.3f}"
    assert np.mean(f1s) >= 0.70, f"mean object F1 {np.mean(f1s):.3f}"
