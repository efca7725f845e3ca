import numpy as np
import pytest
import torch
from skimage import io as skio

from glas_seg.backend.augment import Augmenter, fixed_hed_shift
from glas_seg.backend.data import PatchDataset, Sample, find_pairs, glas_split, patient_split, read_patients


def test_patient_split_never_shares_a_patient():
    names = [f"img{i}" for i in range(40)]
    patients = {n: f"p{i % 7}" for i, n in enumerate(names)}
    train, val = patient_split(names, patients, val_fraction=0.25, seed=3)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 40
    assert {patients[n] for n in train}.isdisjoint({patients[n] for n in val})
    assert len(val) >= 10
    assert patient_split(names, patients, 0.25, seed=3) == (train, val)  # deterministic


def test_glas_split_is_patient_wise(shared_data):
    train, val = glas_split(shared_data / "glas")
    patients = read_patients(shared_data / "glas" / "Grade.csv")
    assert len(train) + len(val) == 85 and 12 <= len(val) <= 25
    assert {patients[p[0]] for p in train}.isdisjoint({patients[p[0]] for p in val})


def test_find_pairs_glas_layout_and_two_folders(tmp_path):
    img = np.zeros((20, 20, 3), np.uint8)
    lab = np.zeros((20, 20), np.uint8)
    for name in ("b_2", "b_10"):
        skio.imsave(tmp_path / f"{name}.bmp", img, check_contrast=False)
        skio.imsave(tmp_path / f"{name}_anno.bmp", lab, check_contrast=False)
    assert [p[0] for p in find_pairs(tmp_path)] == ["b_2", "b_10"]
    (tmp_path / "imgs").mkdir(), (tmp_path / "labs").mkdir()
    skio.imsave(tmp_path / "imgs" / "x.png", img, check_contrast=False)
    skio.imsave(tmp_path / "labs" / "x.png", lab, check_contrast=False)
    pairs = find_pairs(tmp_path / "imgs", tmp_path / "labs")
    assert [(p[0], p[2].parent.name) for p in pairs] == [("x", "labs")]


def test_augmenter_moves_image_and_labels_together():
    rng = np.random.default_rng(0)
    labels = np.zeros((120, 140), np.int32)
    labels[30:70, 40:90] = 7
    image = np.where(labels[..., None] > 0, 0.9, 0.1).astype(np.float32) * np.ones(3, np.float32)
    image += rng.normal(0, 0.001, image.shape).astype(np.float32)
    aug = Augmenter(crop_size=64, seed=1)
    for _ in range(20):
        out_img, out_lab = aug(image, labels + 1)  # +1: 0 marks unknown/padded pixels
        assert out_img.shape == (64, 64, 3) and out_lab.shape == (64, 64)
        inside, outside = out_lab == 8, out_lab == 1
        if inside.sum() > 50 and outside.sum() > 50:
            # Geometric transforms kept the bright object under its label.
            assert out_img[inside].mean() > out_img[outside].mean() + 0.3


def test_hed_shift_changes_colour_not_shape():
    image = np.random.default_rng(0).uniform(0.3, 0.9, (16, 16, 3)).astype(np.float32)
    shifted = fixed_hed_shift(image, [0.3, -0.2, 0.0], [0.0, 0.0, 0.0])
    assert shifted.shape == image.shape and 0 <= shifted.min() and shifted.max() <= 1
    assert np.abs(shifted - image).mean() > 0.01


def test_patch_dataset_yields_normalised_crops_with_ignore(touching_squares):
    image = np.random.default_rng(0).uniform(size=(64, 64, 3)).astype(np.float32)
    ds = PatchDataset([Sample("a", image, touching_squares)], 96, (0.5,) * 3, (0.25,) * 3, augment=False)
    x, y = next(iter(ds))
    assert x.shape == (3, 96, 96) and x.dtype == torch.float32 and y.dtype == torch.int64
    # The 64 px image is padded to 96: padding is ignored (-1), the rest has real classes.
    assert (y == -1).any() and set(torch.unique(y).tolist()) <= {-1, 0, 1, 2}
