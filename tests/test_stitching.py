"""Stitching per-tile instances into one label map."""

from __future__ import annotations

import numpy as np

from glas_seg.backend.stitching import Piece, pieces_from_tile, stitch_pieces, tile_cores


def disk(shape, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def tile_pieces(mask_image: np.ndarray, top: int, left: int, size: int, score: float = 0.9,
                core=None) -> list[Piece]:
    """What a perfect detector sees of ``mask_image``'s objects in one tile."""
    tile = mask_image[top : top + size, left : left + size]
    masks = [(tile == k).astype(np.float32) for k in np.unique(tile) if k and (tile == k).any()]
    return pieces_from_tile(np.array(masks).reshape(-1, *tile.shape), np.full(len(masks), score), top, left,
                            mask_image.shape, core=core)


def test_object_cut_by_tile_edges_is_stitched_back_into_one():
    truth = np.zeros((100, 160), np.int32)
    truth[disk(truth.shape, 50, 80, 35)] = 1  # spans both tiles
    truth[disk(truth.shape, 20, 15, 10)] = 2  # only in the left tile
    pieces = tile_pieces(truth, 0, 0, 100) + tile_pieces(truth, 0, 60, 100)
    assert sum(p.cut for p in pieces) == 2  # the big disk, cut in each tile
    labels = stitch_pieces(pieces, truth.shape)
    assert labels.max() == 2
    big = labels[50, 80]
    assert big > 0 and np.array_equal(labels == big, truth == 1)
    assert np.array_equal(labels == labels[20, 15], truth == 2)


def test_touching_objects_stay_apart_and_duplicates_merge():
    shape = (60, 60)
    left, right = disk(shape, 30, 20, 10), disk(shape, 30, 40, 10)
    pieces = [Piece(0.9, 0, 0, left, False), Piece(0.8, 0, 0, right, False),
              Piece(0.7, 0, 0, left, False)]  # the left object seen again by an overlapping tile
    labels = stitch_pieces(pieces, shape)
    assert labels.max() == 2
    assert np.array_equal(labels == 1, left)  # highest score first, never overwritten
    assert np.array_equal(labels == 2, right & ~left)


def test_edge_flags_ignore_image_borders_and_small_objects_are_removed():
    mask = np.zeros((1, 20, 20), np.float32)
    mask[0, 0:5, 0:5] = 1  # touches the tile's top-left corner, which is the image's corner
    (piece,) = pieces_from_tile(mask, np.array([0.9]), 0, 0, (40, 40))
    assert not piece.cut and (piece.top, piece.left, piece.mask.shape) == (0, 0, (5, 5))
    (piece,) = pieces_from_tile(mask, np.array([0.9]), 10, 0, (40, 40))
    assert piece.cut  # the tile's top edge is inside the image
    padded = np.zeros((1, 20, 20), np.float32)
    padded[0, 15:20, 15:20] = 1  # only in padding beyond a 25x25 image
    assert pieces_from_tile(padded, np.array([0.9]), 10, 10, (25, 25)) == []
    assert stitch_pieces([Piece(0.9, 0, 0, np.ones((3, 3), bool), False)], (10, 10), min_size=10).max() == 0


def test_tile_cores_split_the_overlaps_halfway_between_tile_centres():
    cores = tile_cores([(0, 0), (0, 60), (0, 120)], (100, 100))
    assert cores[0, 0] == (-np.inf, np.inf, -np.inf, 80.0)
    assert cores[0, 60] == (-np.inf, np.inf, 80.0, 140.0)
    assert cores[0, 120] == (-np.inf, np.inf, 140.0, np.inf)


def test_whole_objects_are_kept_by_the_tile_owning_their_centre_and_cut_ones_by_every_tile():
    truth = np.zeros((100, 160), np.int32)
    truth[disk(truth.shape, 50, 72, 6)] = 1  # whole in both tiles, centred in the left tile's core
    truth[disk(truth.shape, 50, 105, 12)] = 2  # cut by the left tile's edge, whole in the right tile
    cores = tile_cores([(0, 0), (0, 60)], (100, 100))
    left = tile_pieces(truth, 0, 0, 100, core=cores[0, 0])
    right = tile_pieces(truth, 0, 60, 100, core=cores[0, 60])
    assert [p.cut for p in left] == [False, True]  # object 1 whole, object 2 cut
    assert [p.cut for p in right] == [False]  # object 1 left to the left tile
    labels = stitch_pieces(left + right, truth.shape)
    assert labels.max() == 2
    for k in (1, 2):
        assert np.array_equal(labels == labels[truth == k][0], truth == k)
