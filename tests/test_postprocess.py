import numpy as np

from glas_seg.backend.postprocess import (fill_holes_per_object, instances_from_probabilities,
                                          remove_small_labels, resize_labels)
from glas_seg.backend.targets import BOUNDARY, INTERIOR, contour_targets


def probabilities_from_targets(targets):
    probs = np.zeros((3,) + targets.shape, np.float32)
    for c in range(3):
        probs[c][targets == c] = 1.0
    return probs


def test_contour_targets_separate_touching_objects(touching_squares):
    targets = contour_targets(touching_squares)
    # The shared edge between ids 1 and 2 is boundary on both sides.
    assert (targets[10:20, 24:26] == BOUNDARY).all()
    assert targets[15, 15] == INTERIOR and targets[0, 0] == 0
    assert set(np.unique(targets)) == {0, 1, 2}


def test_watershed_recovers_touching_objects(touching_squares):
    labels = instances_from_probabilities(probabilities_from_targets(contour_targets(touching_squares)), min_size=10)
    assert labels.max() == 3
    # Each recovered object sits on exactly one true object and covers most of it.
    for true_id in (1, 2, 5):
        ids, counts = np.unique(labels[touching_squares == true_id], return_counts=True)
        assert ids[counts.argmax()] > 0 and counts.max() >= 0.9 * (touching_squares == true_id).sum()


def test_small_objects_and_holes():
    labels = np.zeros((30, 30), np.int32)
    labels[2:12, 2:12] = 4
    labels[5:8, 5:8] = 0  # a hole
    labels[20, 20] = 9    # debris
    filled = fill_holes_per_object(labels)
    assert (filled[5:8, 5:8] == 4).all() and filled[20, 20] == 9
    cleaned = remove_small_labels(filled, 5)
    assert cleaned[20, 20] == 0 and (cleaned[2:12, 2:12] == 4).all()
    assert labels[5, 5] == 0  # inputs are not modified


def test_hole_filling_does_not_flood_a_neighbour():
    labels = np.zeros((20, 20), np.int32)
    labels[2:18, 2:18] = 1
    labels[6:14, 6:14] = 2  # an object inside another one is not a hole
    np.testing.assert_array_equal(fill_holes_per_object(labels), labels)


def test_resize_labels_nearest_keeps_ids():
    labels = np.array([[1, 2], [3, 70000]], np.int32)
    big = resize_labels(labels, (4, 5))
    assert big.shape == (4, 5) and set(np.unique(big)) == {1, 2, 3, 70000}
    assert big[0, 0] == 1 and big[-1, -1] == 70000


def test_hole_filling_with_huge_sparse_ids():
    labels = np.zeros((20, 20), np.int64)
    labels[2:12, 2:12] = 4_000_000_000
    labels[5:8, 5:8] = 0
    labels[14:18, 14:18] = 7
    filled = fill_holes_per_object(labels)
    assert filled.dtype == np.int64 and (filled[2:12, 2:12] == 4_000_000_000).all()
    assert (filled[14:18, 14:18] == 7).all() and filled[0, 0] == 0
    full = np.full((4, 4), 10**12, np.int64)  # no background at all
    np.testing.assert_array_equal(fill_holes_per_object(full), full)


def test_inner_contour_targets_keep_objects_exact_and_separate_touching_ones(touching_squares):
    from glas_seg.backend.targets import contour_targets as targets_of

    targets = targets_of(touching_squares, mode="inner")
    # Foreground is exactly the objects: no boundary pixel outside any object.
    assert np.array_equal(targets > 0, touching_squares > 0)
    # The shared edge of ids 1 and 2 is boundary on both sides, inside each object.
    assert (targets[10:20, 24:26] == BOUNDARY).all()
    assert targets[15, 15] == INTERIOR and targets[4, 15] == 0 and targets[5, 15] == BOUNDARY
    labels = instances_from_probabilities(probabilities_from_targets(targets), min_size=10)
    assert labels.max() == 3
    assert np.array_equal(labels > 0, touching_squares > 0)


def test_full_resolution_outlines_follow_the_smooth_foreground():
    from glas_seg.backend.postprocess import labels_at_full_resolution

    yy, xx = np.mgrid[:200, :200]
    disc = ((yy - 99.5) ** 2 + (xx - 99.5) ** 2 <= 60**2).astype(np.int32)
    # What a network sees at scale 0.5: the disc's area fraction per 2x2 block as probability.
    foreground = disc.reshape(100, 2, 100, 2).mean((1, 3)).astype(np.float32)
    small = (foreground > 0.5).astype(np.int32)
    nearest = resize_labels(small, (200, 200))
    smooth = labels_at_full_resolution(small, foreground, (200, 200))
    assert set(np.unique(smooth)) == {0, 1}
    assert (smooth != disc).sum() < (nearest != disc).sum()


def test_expand_labels_in_strips_equals_skimage():
    from skimage.segmentation import expand_labels

    from glas_seg.backend.postprocess import expand_labels_in_strips

    rng = np.random.default_rng(0)
    labels = np.zeros((203, 151), np.int32)
    for index, (y, x) in enumerate(rng.integers(0, [203, 151], size=(60, 2)), start=1):
        labels[y : y + rng.integers(1, 9), x : x + rng.integers(1, 9)] = index
    for distance in (1, 2, 5):
        for strip in (1, 4, 37, 500):
            np.testing.assert_array_equal(expand_labels_in_strips(labels, distance, strip=strip),
                                          expand_labels(labels, distance))
