"""napari sample data: a GlaS training image and its expert annotation, shipped in the package."""

from __future__ import annotations

from pathlib import Path

from .backend.image_io import read_image, read_labels

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"


def glas_sample() -> list[tuple]:
    """GlaS ``train_12`` (benign, 574x433, 16 glands); in the default model's validation split."""
    image = read_image(SAMPLE_DIR / "glas_train_12.png")
    labels = read_labels(SAMPLE_DIR / "glas_train_12_anno.png")
    return [
        (image, {"name": "glas_train_12", "rgb": True}, "image"),
        (labels, {"name": "glas_train_12 ground truth", "visible": False}, "labels"),
    ]
