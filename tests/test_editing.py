"""Label editing operations (glas_seg.backend.editing) on small arrays with exact outputs."""

import numpy as np
import pytest

from glas_seg.backend.editing import (
    delete_labels,
    fill_holes,
    free_ids,
    merge_labels,
    next_free_id,
    rasterize_path,
    relabel_sequentially,
    remove_small,
    smooth_labels,
    split_along_line,
    split_by_seeds,
)

HUGE = 4_000_000_000  # fits uint32 and int64; a table indexed by id would need 32 GB


def grid(text: str, dtype=np.int32, scale: int = 1) -> np.ndarray:
    """Rows of single characters: '.' is 0, a digit is that id (times ``scale``)."""
    rows = [[0 if ch == "." else int(ch) for ch in line] for line in text.split()]
    return np.asarray(rows, dtype=np.int64).astype(dtype) * dtype(scale)


# -- delete / merge -------------------------------------------------------------------------------
def test_delete_removes_only_the_given_ids(touching_squares):
    before = touching_squares.copy()
    out = delete_labels(touching_squares, [1, 5, 99])
    expected = np.zeros((64, 64), np.int32)
    expected[5:25, 25:45] = 2
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(touching_squares, before)


def test_delete_accepts_a_single_id():
    labels = grid("11. .22 ..3")
    np.testing.assert_array_equal(delete_labels(labels, 2), grid("11. ... ..3"))


def test_merge_keeps_the_first_id_and_needs_no_contact(touching_squares):
    out = merge_labels(touching_squares, [5, 1])
    expected = touching_squares.copy()
    expected[expected == 1] = 5
    np.testing.assert_array_equal(out, expected)
    assert set(np.unique(out)) == {0, 2, 5}


def test_merge_two_fragments():
    labels = grid("11.22 11.22 .....")
    np.testing.assert_array_equal(merge_labels(labels, (2, 1)), grid("22.22 22.22 ....."))


@pytest.mark.parametrize("ids", [[1], [3, 3], []])
def test_merge_needs_two_distinct_ids(ids):
    with pytest.raises(ValueError, match="at least two distinct ids"):
        merge_labels(grid("1.3"), ids)


@pytest.mark.parametrize("bad", [0, -4])
def test_ids_must_be_positive(bad):
    with pytest.raises(ValueError, match="must be positive"):
        delete_labels(grid("12"), [bad])


def test_id_must_fit_the_dtype():
    with pytest.raises(ValueError, match="does not fit in a uint8"):
        merge_labels(grid("12", np.uint8), [1, 300])


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4), np.int32), np.zeros((3, 3), np.float32)])
def test_rejects_non_2d_or_non_integer(bad):
    with pytest.raises(ValueError, match="2D label image|integer label image"):
        delete_labels(bad, [1])


def test_rejects_negative_ids_in_the_image():
    with pytest.raises(ValueError, match="negative"):
        relabel_sequentially(np.array([[0, -1]], np.int32))


# -- split along a line -------------------------------------------------------------------------
def test_split_along_vertical_line():
    labels = grid("""
        ........
        .222222.
        .222222.
        .222222.
        .222222.
        ........""")
    out = split_along_line(labels, [[0, 4], [5, 4]])
    # Left piece (cols 1-3, 12 px) is the larger one and keeps the id; the line column (equally
    # near both pieces) joins it; the right piece gets max + 1.
    expected = grid("""
        ........
        .222233.
        .222233.
        .222233.
        .222233.
        ........""")
    np.testing.assert_array_equal(out, expected)


def test_split_along_diagonal_line():
    labels = grid("""
        ........
        .222222.
        .222222.
        .222222.
        .222222.
        ........""")
    out = split_along_line(labels, [[0, 1], [5, 6]])
    expected = grid("""
        ........
        .223333.
        .222333.
        .222233.
        .222223.
        ........""")
    np.testing.assert_array_equal(out, expected)


def test_split_line_pixels_go_to_the_nearest_piece():
    labels = np.zeros((8, 11), np.int32)
    labels[1:7, 1:10] = 2
    # Down column 6, with a spur along row 3 into the right (smaller) piece.
    out = split_along_line(labels, [[0, 6], [3, 6], [3, 8], [3, 6], [7, 6]])
    expected = labels.copy()
    expected[1:7, 7:10] = 3  # the spur pixels (3, 7), (3, 8) are nearer the right piece
    np.testing.assert_array_equal(out, expected)


def test_split_fused_squares_with_start_id(touching_squares):
    fused = merge_labels(touching_squares, [1, 2])
    out = split_along_line(fused, [[0, 24.6], [30, 25.4]], start_id=70_000)
    expected = touching_squares.copy()
    expected[expected == 2] = 70_000
    expected[5:25, 25] = 1  # the line column is as near to both halves: it stays with the larger
    np.testing.assert_array_equal(out, expected)


def test_split_only_the_crossed_objects_and_ignore_nicks():
    labels = grid("""
        ...........
        .111..3333.
        .111..3333.
        .111..3333.
        ...........""")
    # Crosses object 1 completely; ends inside object 3 (a nick).
    out = split_along_line(labels, [[2, -1], [2, 7]])
    expected = grid("""
        ...........
        .111..3333.
        .111..3333.
        .444..3333.
        ...........""")
    np.testing.assert_array_equal(out, expected)


def test_split_keeps_untouched_fragments_of_the_same_id():
    labels = grid("""
        .........
        .11...11.
        .11...11.
        .11...11.
        .11...11.
        .........""")
    out = split_along_line(labels, [[3, 0], [3, 3]])  # cuts the left fragment only
    expected = grid("""
        .........
        .11...11.
        .11...11.
        .11...11.
        .22...11.
        .........""")
    np.testing.assert_array_equal(out, expected)


def test_split_along_closed_polygon_cuts_inside_from_outside():
    labels = np.zeros((9, 9), np.int32)
    labels[1:8, 1:8] = 7
    out = split_along_line(labels, [[2, 2], [2, 6], [6, 6], [6, 2]], closed=True)
    expected = labels.copy()
    expected[3:6, 3:6] = 8
    np.testing.assert_array_equal(out, expected)


def test_split_line_that_cuts_nothing_raises():
    labels = grid("..... .111. .111. .....")
    with pytest.raises(ValueError, match="does not cut any object"):
        split_along_line(labels, [[1, 0], [1, 2]])  # stops inside the object
    with pytest.raises(ValueError, match="does not cut any object"):
        split_along_line(labels, [[0, 0], [0, 4]])  # on background only


def test_split_line_needs_two_vertices():
    with pytest.raises(ValueError, match="at least two"):
        split_along_line(grid("11"), [[0, 0]])


def test_rasterize_path_exact_and_clipped():
    mask = rasterize_path([[-2, 0], [2, 0], [2, 3]], (4, 4))
    expected = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask, expected)
    closed = rasterize_path([[0, 0], [0, 2], [2, 2]], (3, 3), closed=True)
    np.testing.assert_array_equal(closed, np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1]], bool))


# -- split by seeds -------------------------------------------------------------------------------
DUMBBELL = """
    .............
    .33333..33333
    .33333..33333
    .333333333333
    .33333..33333
    .33333..33333
    ............."""


def test_split_dumbbell_by_two_seeds():
    out = split_by_seeds(grid(DUMBBELL), [[3, 3], [3.2, 9.8]])
    # Equal halves: the first seed's region keeps the id; each takes its side of the bridge.
    expected = grid("""
        .............
        .33333..44444
        .33333..44444
        .333333444444
        .33333..44444
        .33333..44444
        .............""")
    np.testing.assert_array_equal(out, expected)


def test_split_by_seeds_largest_region_keeps_the_id():
    labels = grid(DUMBBELL)
    labels[1:6, 1] = 0  # left half now smaller
    out = split_by_seeds(labels, [[3, 3], [3, 10]], start_id=9)
    expected = labels.copy()
    expected[1:6, 2:6] = 9
    expected[3, 6] = 9
    np.testing.assert_array_equal(out, expected)


def test_split_by_seeds_ignores_background_lone_and_outside_seeds():
    labels = grid("""
        .11.22
        .11.22
        .11.22""")
    with pytest.raises(ValueError, match="at least two seed points"):
        split_by_seeds(labels, [[0, 0], [1, 1], [1, 4], [50, 50], [-3, 1]])
    with pytest.raises(ValueError, match="at least two seed points"):
        split_by_seeds(labels, [[0, 1], [0.4, 1.2]])  # the same pixel twice
    with pytest.raises(ValueError, match="at least two seed points"):
        split_by_seeds(labels, np.zeros((0, 2)))


def test_split_by_seeds_rejects_points_that_are_not_row_col_pairs():
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        split_by_seeds(grid("11 11"), np.zeros((2, 3)))


def test_split_by_seeds_keeps_unseeded_fragments():
    labels = grid(DUMBBELL + " .33..........")
    out = split_by_seeds(labels, [[3, 3], [3, 10]])
    expected = grid("""
        .............
        .33333..44444
        .33333..44444
        .333333444444
        .33333..44444
        .33333..44444
        .............
        .33..........""")
    np.testing.assert_array_equal(out, expected)


# -- fill holes / remove small --------------------------------------------------------------------
RING = """
    .......
    .11111.
    .1...1.
    .1.2.1.
    .1...1.
    .11111.
    ......."""


def test_fill_holes_never_covers_another_object():
    out = fill_holes(grid(RING))
    expected = grid("""
        .......
        .11111.
        .11111.
        .11211.
        .11111.
        .11111.
        .......""")
    np.testing.assert_array_equal(out, expected)


def test_fill_holes_of_selected_ids_only():
    labels = grid("""
        ..........
        .111..222.
        .1.1..2.2.
        .111..222.
        ..........""")
    out = fill_holes(labels, ids=[2])
    labels[2, 7] = 2
    np.testing.assert_array_equal(out, labels)


def test_remove_small_keeps_objects_of_exactly_min_size():
    labels = grid("""
        11.2.333
        11...333
        ..4.....""")
    out = remove_small(labels, 4)
    expected = grid("""
        11...333
        11...333
        ........""")
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="min_size"):
        remove_small(labels, -1)


# -- smooth ------------------------------------------------------------------------------------------
def test_smooth_removes_spur_and_rounds_corners():
    labels = np.zeros((9, 10), np.int32)
    labels[2:7, 2:7] = 1
    labels[4, 7:9] = 1  # a 2-pixel spur
    out = smooth_labels(labels, 1)
    # Opening with a 3x3 cross (disk of radius 1) removes the four corners and the spur's outer
    # pixel; its inner pixel (4, 7) comes back with the dilation of (4, 6). Closing changes nothing.
    expected = np.zeros((9, 10), np.int32)
    expected[2:7, 2:7] = 1
    expected[[2, 2, 6, 6], [2, 6, 2, 6]] = 0
    expected[4, 7] = 1
    np.testing.assert_array_equal(out, expected)


def test_smooth_fills_a_notch_but_never_takes_a_neighbour():
    labels = np.zeros((9, 9), np.int32)
    labels[1:8, 1:8] = 1
    labels[1:4, 4] = 0  # a notch from the top...
    labels[2, 4] = 2  # ...with another object sitting in it
    out = smooth_labels(labels, 1, ids=[1])
    expected = labels.copy()
    expected[3, 4] = 1  # the notch's background is closed, object 2 is kept
    expected[[1, 1, 7, 7], [1, 7, 1, 7]] = 0  # corners rounded by the opening
    expected[1, [3, 5]] = 0  # the notch's convex corners too
    np.testing.assert_array_equal(out, expected)


def test_smooth_treats_the_image_border_as_continuing():
    labels = np.zeros((6, 6), np.int32)
    labels[:, :3] = 4  # touches the top, left and bottom borders
    np.testing.assert_array_equal(smooth_labels(labels, 2), labels)


def test_smooth_leaves_objects_smaller_than_the_disk():
    labels = grid("...... .1.... ...... ...22. ...22. ......")
    out = smooth_labels(labels, 3)
    np.testing.assert_array_equal(out, labels)
    with pytest.raises(ValueError, match="radius"):
        smooth_labels(labels, -1)


# -- relabel / free ids ------------------------------------------------------------------------------
def test_relabel_sequentially_keeps_order_and_dtype():
    labels = grid("7.3 9.3 ..7", np.uint16)
    out = relabel_sequentially(labels)
    np.testing.assert_array_equal(out, grid("2.1 3.1 ..2", np.uint16))
    assert out.dtype == np.uint16


def test_free_ids_above_the_maximum():
    labels = grid("7.3")
    assert next_free_id(labels) == 8
    np.testing.assert_array_equal(free_ids(labels, 3), [8, 9, 10])
    np.testing.assert_array_equal(free_ids(labels, 2, start=4), [4, 5])
    assert next_free_id(np.zeros((2, 2), np.int32)) == 1


def test_free_ids_use_gaps_when_the_dtype_is_full():
    labels = np.array([[255, 1, 2, 4]], np.uint8)
    assert next_free_id(labels) == 3
    np.testing.assert_array_equal(free_ids(labels, 3), [3, 5, 6])
    full = np.arange(256, dtype=np.uint8).reshape(16, 16)
    with pytest.raises(ValueError, match="no 1 free ids"):
        next_free_id(full)


def test_free_ids_rejects_used_or_overflowing_start():
    labels = grid("7.3")
    with pytest.raises(ValueError, match="already used"):
        free_ids(labels, 2, start=6)
    with pytest.raises(ValueError, match="do not fit"):
        free_ids(labels.astype(np.uint8), 2, start=255)


def test_split_uses_gaps_when_max_plus_one_overflows():
    labels = np.full((3, 5), 255, np.uint8)
    labels[0, 0] = 1
    out = split_along_line(labels, [[-1, 2], [3, 2]])
    expected = labels.copy()
    expected[:, :2] = 2  # the smaller left piece (5 px) gets the first unused id
    expected[0, 0] = 1
    np.testing.assert_array_equal(out, expected)


# -- huge sparse ids and purity ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint32, np.int64])
def test_huge_sparse_ids(dtype):
    labels = np.zeros((8, 12), dtype)
    labels[1:7, 1:5] = HUGE
    labels[3, 2] = 0  # a hole
    labels[1:7, 7:11] = 70_000
    assert next_free_id(labels) == HUGE + 1
    filled = fill_holes(labels)
    assert filled[3, 2] == HUGE and filled.dtype == dtype
    np.testing.assert_array_equal(relabel_sequentially(filled)[[1, 1], [1, 7]], [2, 1])
    merged = merge_labels(filled, [HUGE, 70_000])
    assert set(np.unique(merged)) == {0, HUGE}
    cut = split_along_line(merged, [[0, 9], [8, 9]])  # cuts column 10 off the right fragment
    np.testing.assert_array_equal(np.unique(cut), [0, HUGE, HUGE + 1])
    np.testing.assert_array_equal(cut[1:7, 10], np.full(6, HUGE + 1, dtype))
    np.testing.assert_array_equal(np.unique(smooth_labels(labels, 1)), [0, 70_000, HUGE])
    assert (delete_labels(labels, HUGE) == HUGE).sum() == 0
    assert (remove_small(labels, 24) == 70_000).sum() == 24


def test_ids_near_the_top_of_uint64():
    top = np.iinfo(np.uint64).max
    labels = np.zeros((6, 6), np.uint64)
    labels[1:5, 1:5] = top - 1
    labels[2, 2] = 0
    np.testing.assert_array_equal(fill_holes(labels)[1:5, 1:5], np.full((4, 4), top - 1, np.uint64))
    out = split_by_seeds(labels, [[1, 1], [4, 4]])
    assert set(np.unique(out).tolist()) == {0, top - 1, top}
    assert relabel_sequentially(labels).max() == 1


OPERATIONS = [
    lambda a: delete_labels(a, [1]),
    lambda a: merge_labels(a, [1, 2]),
    lambda a: split_along_line(a, [[0, 30], [30, 30]]),
    lambda a: split_by_seeds(a, [[8, 8], [20, 20]]),
    lambda a: fill_holes(a),
    lambda a: remove_small(a, 500),
    lambda a: smooth_labels(a, 2),
    lambda a: relabel_sequentially(a),
]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_operations_never_modify_their_input(operation, touching_squares):
    labels = touching_squares.copy()
    labels[10, 10] = 0
    before = labels.copy()
    out = operation(labels)
    np.testing.assert_array_equal(labels, before)
    assert out is not labels and out.dtype == labels.dtype and out.shape == labels.shape


@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_smooth_equals_opening_then_closing_with_a_disk_footprint(radius):
    from scipy import ndimage as ndi
    from skimage.morphology import disk

    rng = np.random.default_rng(radius)
    blob = ndi.binary_dilation(rng.random((40, 40)) > 0.97, disk(4))  # an irregular shape
    labels = np.zeros((60, 60), np.int32)
    labels[10:50, 10:50] = blob * 3  # 10 px of background all round: no border effects
    footprint = disk(radius).astype(bool)
    expected = ndi.binary_closing(ndi.binary_opening(labels == 3, footprint), footprint)
    assert 0 < expected.sum() and not np.array_equal(expected, labels == 3)
    np.testing.assert_array_equal(smooth_labels(labels, radius), np.where(expected, 3, 0))


def test_smooth_an_object_covering_the_whole_image():
    labels = np.full((5, 6), 2, np.uint16)
    np.testing.assert_array_equal(smooth_labels(labels, 2), labels)


@pytest.mark.parametrize("radius", [1, 2, 4, 7])
def test_disk_erosion_and_dilation_match_scipy_with_a_disk_footprint(radius):
    from scipy import ndimage as ndi
    from skimage.morphology import disk

    from glas_seg.backend.editing import _dilate, _erode

    rng = np.random.default_rng(radius)
    mask = ndi.binary_dilation(rng.random((37, 29)) > 0.9, disk(2))
    footprint = disk(radius).astype(bool)
    # Beyond the array: foreground for the erosion, background for the dilation.
    np.testing.assert_array_equal(_erode(mask, radius), ndi.binary_erosion(mask, footprint, border_value=1))
    np.testing.assert_array_equal(_dilate(mask, radius), ndi.binary_dilation(mask, footprint))
