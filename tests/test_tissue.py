"""Blank glass next to tissue (issue 16): found, hidden from the network, background in the result."""

from __future__ import annotations

import numpy as np
import pytest

from glas_seg.backend.tissue import fill_glass, glass_mask


def textured_tissue(shape=(120, 160), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([0.75, 0.45, 0.7], np.float32)
    return np.clip(base + rng.normal(0, 0.12, shape + (3,)), 0, 1).astype(np.float32)


@pytest.mark.parametrize("level", [236 / 255, 1.0])
def test_glass_around_tissue_is_found_and_lumen_inside_tissue_is_not(level):
    tissue = textured_tissue()
    tissue[40:70, 60:100] = 0.97  # a flat white "lumen" surrounded by tissue
    canvas = np.pad(tissue, ((50, 50), (50, 50), (0, 0)), constant_values=level)
    glass = glass_mask(canvas)
    expected = np.ones(canvas.shape[:2], bool)
    expected[50:-50, 50:-50] = False
    # All glass but a thin band at the tissue edge (the flatness window straddles it) ...
    assert (glass & expected).sum() > 0.95 * expected.sum()
    # ... and nothing inside the tissue, the lumen included.
    assert not glass[52:-52, 52:-52].any()


def test_plain_tissue_has_no_glass():
    assert not glass_mask(textured_tissue()).any()


def test_fill_glass_mirrors_tissue_across_the_edge():
    tissue = textured_tissue((60, 80))
    canvas = np.pad(tissue, ((0, 0), (0, 40), (0, 0)), constant_values=1.0)
    glass = np.zeros(canvas.shape[:2], bool)
    glass[:, 80:] = True
    filled = fill_glass(canvas, glass)
    # Glass column 80 + k takes tissue column 78 - k: the reflection about the last tissue column.
    for k in range(0, 40, 7):
        assert np.array_equal(filled[:, 80 + k], tissue[:, 78 - k])
    assert np.array_equal(filled[:, :80], tissue)
    assert np.array_equal(fill_glass(tissue, np.zeros(tissue.shape[:2], bool)), tissue)


def test_default_model_finds_glands_on_glass_as_well_as_in_plain_images(shared_data, one_torch_thread):
    """Issue 16's check: the validation images on a 300 px margin of grey (236) or white glass,
    segmented and cropped back, score within 0.01 pooled object F1 of the plain images."""
    from glas_seg.backend.data import dataset_split, load_sample
    from glas_seg.backend.inference import segment
    from glas_seg.backend.metrics import match_stack, object_scores
    from glas_seg.backend.registry import DEFAULT_MODEL, load_model

    model = load_model(DEFAULT_MODEL, "cpu")
    _, val_pairs = dataset_split(shared_data / "glas")
    margin = 300
    matches = {"plain": [], "grey": [], "white": []}
    for pair in val_pairs:
        sample = load_sample(*pair)
        matches["plain"] += match_stack(segment(model, sample.image).labels, sample.labels)
        for name, level in (("grey", 236 / 255), ("white", 1.0)):
            canvas = np.pad(sample.image, ((margin, margin), (margin, margin), (0, 0)), constant_values=level)
            labels = segment(model, canvas).labels[margin:-margin, margin:-margin]
            matches[name] += match_stack(labels, sample.labels)
    f1 = {name: object_scores(m)["object_f1"] for name, m in matches.items()}
    assert f1["grey"] >= f1["plain"] - 0.01 and f1["white"] >= f1["plain"] - 0.01, f1


def test_edge_band_zero_does_not_flood_pale_tissue():
    tissue = textured_tissue()
    tissue[:, :40] = 0.985  # pale, flat tissue of nearly the glass's colour, next to the glass
    tissue[:, :40] += np.random.default_rng(1).normal(0, 0.05, (120, 40, 3)).astype(np.float32)
    canvas = np.pad(np.clip(tissue, 0, 1), ((0, 0), (60, 0), (0, 0)), constant_values=1.0)
    bands = [glass_mask(canvas, edge_band=n) for n in (0, 1, 5)]
    assert bands[0][:, :50].mean() > 0.9
    # A wider band only adds pixels next to the glass; no band adds none (scipy's iterations=0
    # would grow the glass until nothing changes).
    assert (bands[0] <= bands[1]).all() and (bands[1] <= bands[2]).all()
    assert bands[1].sum() - bands[0].sum() <= 2 * canvas.shape[0]


def test_fill_glass_in_place_and_in_row_blocks_equals_the_copy():
    rng = np.random.default_rng(3)
    rgb = rng.random((70, 50, 3)).astype(np.float32) * 0.5
    glass = np.zeros((70, 50), bool)
    glass[:, :12] = True
    glass[55:, :] = True
    glass[30:34, 20:24] = True  # a glass pocket whose mirror falls on glass
    expected = fill_glass(rgb, glass, block=10_000)
    blocked = fill_glass(rgb, glass, block=7)
    in_place = rgb.copy()
    returned = fill_glass(in_place, glass, out=in_place, block=5)
    assert returned is in_place
    np.testing.assert_array_equal(blocked, expected)
    np.testing.assert_array_equal(in_place, expected)
    np.testing.assert_array_equal(expected[~glass], rgb[~glass])  # tissue untouched
    assert not np.array_equal(expected[glass], rgb[glass])
