"""GlaS object metrics, pixel metrics, ROC and the evaluation report.

Expected values are computed by hand in the comments; a slow, literal implementation of the
challenge definitions (one full-image mask per object, all-pairs pixel distances) checks the
fast one on random label maps.
"""

import json
import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from skimage.morphology import dilation, disk, erosion
from skimage.segmentation import expand_labels

from glas_seg.backend.image_io import read_labels
from glas_seg.backend.metrics import (
    contingency, f1_from_counts, hausdorff_distance, match_objects, match_stack, object_detection_counts,
    object_dice, object_f1, object_hausdorff, object_scores, pixel_dice,
)
from glas_seg.backend.metrics_pixel import auc, pixel_counts, pixel_scores, roc_curve
from glas_seg.backend.metrics_report import (
    COLUMNS, natural_key, pair_label_files, score_image, score_set, write_csv, write_json,
)


def scores(seg, gt):
    return object_scores(match_stack(seg, gt))


def canvas(shape=(40, 40)):
    return np.zeros(shape, dtype=np.int32)


# -- hand-computed cases --------------------------------------------------------------------
def test_shifted_squares():
    gt, seg = canvas(), canvas()
    gt[5:15, 5:15] = 1
    seg[7:17, 5:15] = 1  # 2 rows down: overlap 80 of 100 px
    s = scores(seg, gt)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 0)
    assert s["object_f1"] == 1.0
    assert s["object_dice"] == pytest.approx(2 * 80 / 200)
    assert s["object_hausdorff"] == pytest.approx(2.0)


def test_split_gland():
    gt, seg = canvas(), canvas()
    gt[5:15, 5:25] = 1  # 10 x 20 = 200 px
    seg[5:15, 5:17] = 1  # left 120 px: covers 60 % -> TP
    seg[5:15, 17:25] = 2  # right 80 px: covers 40 % -> FP
    s = scores(seg, gt)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)
    assert s["object_f1"] == pytest.approx(2 / 3)
    # S side: 0.6 * (2*120/320) + 0.4 * (2*80/280); G side: 1 * (2*120/320) -> 5/7
    assert s["object_dice"] == pytest.approx(0.5 * (0.6 * 0.75 + 0.4 * 160 / 280 + 0.75))
    assert s["object_dice"] == pytest.approx(5 / 7)
    # H(S1, G) = 8 (G's right end, column 24, to S1's last column 16); H(S2, G) = 12.
    assert s["object_hausdorff"] == pytest.approx(0.5 * (0.6 * 8 + 0.4 * 12 + 8))


def test_two_merged_glands():
    gt, seg = canvas(), canvas()
    gt[5:15, 5:15] = 1
    gt[5:15, 17:27] = 2  # 2-column gap
    seg[5:15, 5:27] = 9  # one 220 px object over both and the gap
    s = scores(seg, gt)
    # Equal overlaps: the partner is the smaller id (Matlab's mode), which it fully covers.
    m = match_objects(seg, gt)
    assert m.seg_partner.tolist() == [1]
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 1)
    assert s["object_f1"] == pytest.approx(2 / 3)
    assert s["object_dice"] == pytest.approx(200 / 320)  # every pair scores 2*100/(220+100)
    assert s["object_hausdorff"] == pytest.approx(12.0)  # column 26 -> 14 (and back) is 12 px


def test_false_blob_in_background():
    gt, seg = canvas(), canvas()
    gt[2:12, 2:12] = 1
    seg[2:12, 2:12] = 1
    seg[22:26, 22:26] = 2  # 16 px, no overlap
    s = scores(seg, gt)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)
    assert s["object_dice"] == pytest.approx(0.5 * (100 / 116 + 1))
    # The blob's nearest ground truth is the square: H = |(2,2) - (22,22)| = 20 sqrt(2).
    assert match_objects(seg, gt).seg_hausdorff[1] == pytest.approx(20 * math.sqrt(2))
    assert s["object_hausdorff"] == pytest.approx(0.5 * (16 / 116) * 20 * math.sqrt(2))


def test_missed_gland():
    gt, seg = canvas(), canvas()
    gt[2:12, 2:12] = 1
    gt[2:12, 22:32] = 2
    seg[2:12, 2:12] = 5
    s = scores(seg, gt)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 1)
    assert (s["object_precision"], s["object_recall"]) == (1.0, 0.5)
    assert s["object_dice"] == pytest.approx(0.5 * (1 + 0.5 * 1 + 0.5 * 0))
    # The missed gland's nearest segmented object is 20 columns away: H = 20.
    assert s["object_hausdorff"] == pytest.approx(0.5 * (0 + 0.5 * 0 + 0.5 * 20))
    assert match_objects(seg, gt).false_negative_ids.tolist() == [2]


def test_unmatched_object_takes_the_partner_at_the_smallest_hausdorff_distance():
    seg, gt = canvas((60, 60)), canvas((60, 60))
    seg[28:31, 28:31] = 1  # 3x3 blob
    gt[:, 33] = 1  # bar 3 px away, but long: H = |(59,33) - (30,30)| = sqrt(29² + 3²)
    gt[28:31, 20:23] = 2  # square 6 px away, same shape: H = 8
    m = match_objects(seg, gt)
    assert m.seg_hausdorff.tolist() == [8.0]
    assert m.gt_hausdorff == pytest.approx([math.sqrt(850), 8.0])
    s = object_scores([m])
    assert s["object_hausdorff"] == pytest.approx(0.5 * (8 + 60 / 69 * math.sqrt(850) + 9 / 69 * 8))
    assert s["object_dice"] == 0.0


def test_id_made_of_several_pieces_is_one_object():
    gt, seg = canvas(), canvas()
    gt[2:12, 2:12] = 1
    gt[2:12, 22:32] = 1  # one id, two pieces, 200 px
    seg[2:12, 2:12] = 1
    seg[2:12, 22:32] = 2
    s = scores(seg, gt)
    # Each segmented piece covers exactly 50 %: not more than half, so both are false positives.
    assert (s["tp"], s["fp"], s["fn"]) == (0, 2, 1)
    assert s["object_f1"] == 0.0
    assert s["object_dice"] == pytest.approx(2 / 3)  # 2*100/(100+200) on every pair
    assert s["object_hausdorff"] == pytest.approx(20.0)


def test_hausdorff_is_not_only_on_the_boundary():
    a = np.zeros((21, 21), bool)
    a[0:21, 0:21] = True
    ring = a.copy()
    ring[2:19, 2:19] = False  # B = rows/columns 0-1 and 19-20: A's centre (10, 10) is 9 px from B
    assert hausdorff_distance(a, ring) == pytest.approx(9.0)  # A's boundary is all on B: 0
    assert hausdorff_distance(a, np.zeros_like(a)) == math.inf
    assert hausdorff_distance(np.zeros_like(a), np.zeros_like(a)) == 0.0


# -- edge cases -----------------------------------------------------------------------------
def test_both_empty_and_one_empty():
    empty, one = canvas(), canvas()
    one[3:8, 3:8] = 4
    both = scores(empty, empty)
    assert (both["object_f1"], both["object_dice"], both["object_hausdorff"]) == (1.0, 1.0, 0.0)
    for seg, gt in ((one, empty), (empty, one)):
        s = scores(seg, gt)
        assert (s["object_f1"], s["object_dice"], s["object_hausdorff"]) == (0.0, 0.0, math.inf)
    assert object_scores([]) == scores(empty, empty)


@pytest.mark.parametrize("dtype, ids", [(np.uint8, (7, 200)), (np.uint16, (300, 65535)),
                                        (np.int32, (70000, 2**31 - 1)), (np.int64, (2**40, 5)),
                                        (np.uint64, (2**63 + 5, 1))])
def test_large_and_non_sequential_ids(dtype, ids):
    gt, seg = canvas(), canvas()
    gt[2:12, 2:12], gt[2:12, 22:32] = 1, 2
    seg[4:14, 2:12], seg[2:12, 22:27] = 1, 2
    expected = scores(seg, gt)
    gt2, seg2 = np.zeros(gt.shape, dtype), np.zeros(seg.shape, dtype)
    gt2[gt == 1], gt2[gt == 2] = ids
    seg2[seg == 1], seg2[seg == 2] = ids[::-1]
    assert scores(seg2, gt2) == pytest.approx(expected)
    m = match_objects(seg2, gt2)
    assert sorted(m.seg_ids.tolist()) == sorted(ids)
    assert m.seg_ids.dtype == dtype


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        match_objects(canvas((10, 10)), canvas((10, 11)))
    with pytest.raises(ValueError, match="negative"):
        match_objects(-np.ones((5, 5), int), canvas((5, 5)))
    with pytest.raises(ValueError, match="integer label map"):
        match_objects(np.zeros((5, 5)), canvas((5, 5)))
    with pytest.raises(ValueError, match="2D"):
        match_objects(canvas((2, 5, 5)), canvas((2, 5, 5)))


def test_stacks_are_scored_per_plane_and_pooled():
    gt, seg = np.zeros((2, 40, 40), np.int32), np.zeros((2, 40, 40), np.int32)
    gt[0, 5:15, 5:15], seg[0, 7:17, 5:15] = 1, 1  # shifted squares: Dice 0.8
    gt[1, 2:12, 2:12], gt[1, 2:12, 22:32], seg[1, 2:12, 2:12] = 1, 2, 1  # missed gland
    s = scores(seg, gt)
    # Id 1 in two planes is two objects.
    assert (s["n_pred"], s["n_gt"], s["tp"], s["fp"], s["fn"]) == (2, 3, 2, 0, 1)
    assert object_detection_counts(seg, gt) == {"tp": 2, "fp": 0, "fn": 1}
    # Pooled weights: S side (100*0.8 + 100*1)/200, G side (100*0.8 + 100*1 + 100*0)/300.
    assert object_dice(seg, gt) == pytest.approx(0.5 * (0.9 + 0.6))
    assert object_hausdorff(seg, gt) == pytest.approx(0.5 * (100 * 2 + 100 * 0) / 200 + 0.5 * (100 * 2 + 0 + 100 * 20) / 300)
    report = score_set([(f"plane {i}", seg[i], gt[i]) for i in range(2)])
    assert report.pooled["object_dice"] == pytest.approx(0.75)
    assert report.mean_per_image["object_dice"] == pytest.approx((0.8 + 0.75) / 2)


def test_legacy_functions_agree_with_the_new_ones(touching_squares):
    seg = touching_squares.copy()
    seg[seg == 2] = 1  # merge the two touching squares
    assert object_detection_counts(seg, touching_squares) == {"tp": 2, "fp": 0, "fn": 1}
    assert object_f1(seg, touching_squares) == pytest.approx(f1_from_counts(2, 0, 1)) == pytest.approx(0.8)
    assert pixel_dice(seg, touching_squares) == 1.0
    seg_ids, gt_ids, table = contingency(seg, touching_squares)
    assert seg_ids.tolist() == [1, 5] and gt_ids.tolist() == [1, 2, 5]
    assert table.toarray().tolist() == [[64 * 64 - 1200, 0, 0, 0], [0, 400, 400, 0], [0, 0, 0, 400]]


# -- properties and a literal reference ----------------------------------------------------
def random_labels(rng, shape=(48, 56), n=6):
    labels = np.zeros(shape, np.int64)
    for i in range(1, n + 1):
        r, c = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        h, w = rng.integers(3, 16, size=2)
        labels[r:r + h, c:c + w] = rng.integers(1, 10**6)
    return labels


def reference_scores(seg, gt):
    """The challenge definitions read literally: slow, full-image masks, all-pairs distances."""
    S = [seg == i for i in np.unique(seg) if i]
    G = [gt == i for i in np.unique(gt) if i]

    def hd(a, b):
        d = cdist(np.argwhere(a), np.argwhere(b))
        return max(d.min(axis=1).max(), d.min(axis=0).max())

    def side(objs, others):
        total, dice, haus, partners = sum(o.sum() for o in objs), 0.0, 0.0, []
        for o in objs:
            overlaps = [(o & p).sum() for p in others]
            best = int(np.argmax(overlaps)) if overlaps and max(overlaps) > 0 else None
            partners.append((best, overlaps[best] if best is not None else 0))
            w = o.sum() / total
            if best is not None:
                p = others[best]
                dice += w * 2 * (o & p).sum() / (o.sum() + p.sum())
                haus += w * hd(o, p)
            else:
                haus += w * min(hd(o, p) for p in others)
        return dice, haus, partners

    ds, hs, partners = side(S, G)
    dg, hg, _ = side(G, S)
    tp = sum(1 for best, ov in partners if best is not None and ov > 0.5 * G[best].sum())
    return {"object_f1": 2 * tp / (len(S) + len(G)), "object_dice": (ds + dg) / 2, "object_hausdorff": (hs + hg) / 2}


@pytest.mark.parametrize("seed", range(12))
def test_matches_a_literal_reference_on_random_label_maps(seed):
    rng = np.random.default_rng(seed)
    seg, gt = random_labels(rng), random_labels(rng)
    expected = reference_scores(seg, gt)
    got = scores(seg, gt)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


@pytest.mark.parametrize("seed", range(6))
def test_properties(seed):
    rng = np.random.default_rng(100 + seed)
    seg, gt = random_labels(rng), random_labels(rng)
    perfect = scores(gt, gt)
    assert (perfect["object_f1"], perfect["object_dice"], perfect["object_hausdorff"]) == (1.0, 1.0, 0.0)
    # Permuting ids (to other, larger values) changes nothing; ids only break exact ties of
    # overlap, which these maps do not have.
    table = contingency(seg, gt)[2].toarray()[1:, 1:]
    for overlaps in (table, table.T):
        top = overlaps.max(axis=1, keepdims=True)
        assert ((overlaps == top) & (top > 0)).sum(axis=1).max() <= 1
    ids = np.unique(seg)[1:]
    mapping = dict(zip(ids, rng.permutation(ids) + 2**33))
    permuted = np.vectorize(lambda v: mapping.get(v, 0))(seg)
    assert scores(permuted, gt) == pytest.approx(scores(seg, gt))
    # Object Dice and Hausdorff are symmetric in S and G. F1 is not: a true positive needs
    # S to cover > 50 % of G, which says nothing about G covering > 50 % of S.
    a, b = scores(seg, gt), scores(gt, seg)
    for key in ("object_dice", "object_hausdorff"):
        assert a[key] == pytest.approx(b[key]), key


# -- pixel metrics and ROC -----------------------------------------------------------------
def test_pixel_metrics_by_hand():
    seg = np.array([[1, 1, 0, 0], [2, 0, 0, 0]])
    gt = np.array([[3, 0, 0, 0], [3, 3, 0, 0]])
    counts = pixel_counts(seg, gt)
    assert counts == {"tp": 2, "fp": 1, "fn": 1, "tn": 4}
    s = pixel_scores(counts)
    assert s == pytest.approx({"pixel_precision": 2 / 3, "pixel_recall": 2 / 3, "pixel_dice": 2 / 3,
                               "pixel_iou": 0.5, "pixel_accuracy": 0.75, "pixel_specificity": 0.8})
    assert pixel_dice(seg, gt) == pytest.approx(s["pixel_dice"])


def test_pixel_metrics_undefined_ratios():
    empty = np.zeros((3, 3), int)
    assert set(pixel_scores(pixel_counts(empty, empty)).values()) == {1.0}
    full = np.ones((3, 3), int)
    s = pixel_scores(pixel_counts(empty, full))  # nothing predicted, all foreground
    assert (s["pixel_precision"], s["pixel_specificity"], s["pixel_dice"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_counts(empty, np.zeros((3, 4)))


def test_roc_by_hand():
    fpr, tpr, thresholds = roc_curve(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0]))
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1]
    assert tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    assert thresholds.tolist() == [math.inf, 0.9, 0.8, 0.7, 0.6]
    assert auc(fpr, tpr) == pytest.approx(0.75)
    fpr, tpr, _ = roc_curve(np.array([[0.5, 0.5], [0.2, 0.9]]), np.array([[1, 0], [0, 1]]))  # a tie
    assert fpr.tolist() == [0, 0, 0.5, 1] and tpr.tolist() == [0, 0.5, 1, 1]
    assert auc(fpr, tpr) == pytest.approx(0.875)
    with pytest.raises(ValueError, match="both foreground and background"):
        roc_curve(np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        roc_curve(np.array([np.nan, 1]), np.array([0, 1]))


def test_roc_matches_its_definition_on_random_scores_with_ties():
    rng = np.random.default_rng(7)
    truth = rng.random(500) < 0.3
    scores = np.round(np.clip(truth * 0.3 + rng.random(500) * 0.7, 0, 1), 2).astype(np.float32)
    fpr, tpr, thresholds = roc_curve(scores, truth)
    for f, t, threshold in zip(fpr[1:], tpr[1:], thresholds[1:]):
        assert t == pytest.approx(np.mean(scores[truth] >= threshold))
        assert f == pytest.approx(np.mean(scores[~truth] >= threshold))
    assert len(thresholds) == len(np.unique(scores)) + 1
    # AUC = probability that a random positive outscores a random negative (ties count half).
    diff = scores[truth][:, None] - scores[~truth][None, :]
    assert auc(fpr, tpr) == pytest.approx(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


# -- report ---------------------------------------------------------------------------------
def test_score_image_and_exports(tmp_path):
    gt, seg = canvas(), canvas()
    gt[5:15, 5:15] = 1
    seg[7:17, 5:15] = 1
    prob = (gt > 0) * 0.9 + 0.05
    report = score_set([("a", seg, gt, prob), ("b", seg, canvas())])
    assert report.images["a"].row["roc_auc"] == pytest.approx(1.0)
    assert math.isnan(report.images["b"].row["roc_auc"])
    assert report.roc is None  # not every image has a probability map
    assert report.images["b"].row["object_hausdorff"] == math.inf
    assert report.pooled["object_hausdorff"] == math.inf and report.pooled["fp"] == 1
    write_json(report, tmp_path / "m.json")
    data = json.loads((tmp_path / "m.json").read_text())
    assert set(data) == {"pooled", "mean_per_image", "images"}
    assert data["images"]["a"]["object_dice"] == pytest.approx(0.8)
    assert data["pooled"]["object_hausdorff"] is None  # JSON has no infinity
    write_csv(report, tmp_path / "m.csv")
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0].split(",") == ["image", *COLUMNS]
    assert [line.split(",")[0] for line in lines[1:]] == ["a", "b", "pooled", "mean_per_image"]
    with pytest.raises(ValueError, match="differ in shape"):
        score_image("x", seg, gt, prob[:10])


def test_pair_label_files(tmp_path):
    import tifffile
    from skimage import io as skio

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    img = np.zeros((8, 8), np.uint8)
    for name in ("train_2_labels.tif", "train_10_labels.tif", "plain.tif", "extra_labels.tif"):
        tifffile.imwrite(pred / name, img)
    for name in ("train_2.bmp", "train_2_anno.bmp", "train_10_anno.bmp", "plain.png", "lonely_anno.bmp"):
        skio.imsave(gt / name, img, check_contrast=False)
    pairs, pred_only, gt_only = pair_label_files(pred, gt)
    assert [(n, p.name, g.name) for n, p, g in pairs] == [
        ("plain", "plain.tif", "plain.png"),
        ("train_2", "train_2_labels.tif", "train_2_anno.bmp"),
        ("train_10", "train_10_labels.tif", "train_10_anno.bmp"),
    ]
    assert (pred_only, gt_only) == (["extra"], ["lonely"])
    tifffile.imwrite(pred / "plain.png", img)
    with pytest.raises(ValueError, match="Ambiguous"):
        pair_label_files(pred, gt)
    with pytest.raises(FileNotFoundError):
        pair_label_files(tmp_path / "nope", gt)
    assert sorted(["a10", "a2", "b1"], key=natural_key) == ["a2", "a10", "b1"]


# -- real GlaS annotations ------------------------------------------------------------------
GLAS_IMAGES = ("train_1", "train_12", "train_27", "train_50", "train_70")


@pytest.fixture(scope="module")
def glas_annotations(shared_data):
    return [read_labels(shared_data / "glas" / "train" / f"{name}_anno.bmp") for name in GLAS_IMAGES]


def pooled(preds, gts):
    return object_scores([m for p, g in zip(preds, gts) for m in match_stack(p, g)])


def erode_labels(labels, radius):
    """Each object eroded on its own: a pixel stays when its whole disk holds its own id."""
    keep = (erosion(labels, disk(radius)) == labels) & (dilation(labels, disk(radius)) == labels)
    return np.where(keep, labels, 0)


def merge_random_neighbours(labels, rng):
    """Give half of the glands the id of a neighbour (touching once grown by 15 px): one id, two pieces."""
    out = expand_labels(labels, 15)  # touching neighbours
    ids = np.unique(labels)[1:]
    for i in rng.choice(ids, size=len(ids) // 2, replace=False):
        grown = expand_labels(np.where(out == i, i, 0), 2)
        neighbours = np.unique(out[(grown == i) & (out != i) & (out > 0)])
        if neighbours.size:
            out[out == neighbours[0]] = i
    return np.where(labels > 0, out, 0)


def test_glas_annotations_against_themselves(glas_annotations):
    s = pooled(glas_annotations, glas_annotations)
    assert (s["object_f1"], s["object_dice"], s["object_hausdorff"]) == (1.0, 1.0, 0.0)
    assert s["n_gt"] == sum(len(np.unique(g)) - 1 for g in glas_annotations)


def test_glas_scores_move_the_right_way(glas_annotations):
    gts = glas_annotations
    eroded = [pooled([erode_labels(g, r) for g in gts], gts) for r in (2, 6)]
    dilated = [pooled([expand_labels(g, r) for g in gts], gts) for r in (3, 10)]
    merged = pooled([merge_random_neighbours(g, np.random.default_rng(i)) for i, g in enumerate(gts)], gts)
    for worse_and_worse in (eroded, dilated):
        light, heavy = worse_and_worse
        assert 1.0 > light["object_dice"] > heavy["object_dice"] > 0.5
        assert 0.0 < light["object_hausdorff"] < heavy["object_hausdorff"]
    # Small erosion/dilation keeps glands detected; a radius-r change moves boundaries >= r px.
    assert eroded[0]["object_f1"] > 0.95 and dilated[0]["object_f1"] > 0.95
    assert eroded[0]["object_hausdorff"] >= 2 and dilated[1]["object_hausdorff"] >= 10
    # Merging: fewer predicted objects, missed glands, worse F1 and Dice than the annotation.
    assert merged["n_pred"] < merged["n_gt"] and merged["fn"] > 0
    assert merged["object_f1"] < 0.9 and merged["object_dice"] < 0.95
