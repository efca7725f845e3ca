"""``glas-seg evaluate PRED_DIR GT_DIR``: pairing, the printed table, CSV and JSON."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
import tifffile
from skimage import io as skio

from glas_seg.backend.image_io import read_labels
from glas_seg.backend.metrics import match_objects, object_scores
from glas_seg.cli import main


def write_squares(pred_dir, gt_dir):
    """a: square shifted 2 rows (F1 1, Dice 0.8, Hausdorff 2); b: perfect; c: prediction empty."""
    pred_dir.mkdir(exist_ok=True)
    gt_dir.mkdir(exist_ok=True)
    gt = np.zeros((40, 40), np.uint8)
    gt[5:15, 5:15] = 1
    shifted = np.zeros((40, 40), np.int32)
    shifted[7:17, 5:15] = 70000  # an id beyond 16 bits
    tifffile.imwrite(pred_dir / "a_labels.tif", shifted)
    tifffile.imwrite(pred_dir / "b.tif", gt.astype(np.int32))
    tifffile.imwrite(pred_dir / "c_labels.tif", np.zeros((40, 40), np.int32))
    for name in ("a", "b", "c"):
        skio.imsave(gt_dir / f"{name}_anno.bmp", gt, check_contrast=False)
        skio.imsave(gt_dir / f"{name}.bmp", np.zeros((40, 40, 3), np.uint8), check_contrast=False)  # the H&E image


def test_evaluate_hand_computed(tmp_path, capsys):
    write_squares(tmp_path / "pred", tmp_path / "gt")
    code = main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"),
                 "--csv", str(tmp_path / "m.csv"), "--json", str(tmp_path / "m.json")])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out if line and line[0] in "abc"}
    assert rows["a"][:3] == ["1.000", "0.800", "2.00"]
    assert rows["b"][:3] == ["1.000", "1.000", "0.00"]
    assert rows["c"][:3] == ["0.000", "0.000", "inf"]
    pooled = next(line for line in out if line.startswith("pooled"))
    # Pooled: TP 2, FP 0, FN 1 -> F1 4/5; Dice: S side (0.8 + 1)/2, G side (0.8 + 1 + 0)/3.
    assert pooled.split()[2:5] == ["0.800", f"{0.5 * (0.9 + 0.6):.3f}", "inf"]

    data = json.loads((tmp_path / "m.json").read_text())
    assert set(data) == {"pooled", "mean_per_image", "images"}
    assert list(data["images"]) == ["a", "b", "c"]
    assert data["pooled"]["object_f1"] == pytest.approx(0.8)
    assert data["pooled"]["object_dice"] == pytest.approx(0.75)
    assert data["pooled"]["object_hausdorff"] is None  # infinite: one image has no prediction
    assert data["images"]["a"]["object_hausdorff"] == pytest.approx(2.0)
    assert data["mean_per_image"]["object_dice"] == pytest.approx((0.8 + 1 + 0) / 3)

    with open(tmp_path / "m.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["image"] for r in table] == ["a", "b", "c", "pooled", "mean_per_image"]
    assert float(table[0]["object_dice"]) == pytest.approx(0.8)
    assert math.isinf(float(table[2]["object_hausdorff"]))


def test_evaluate_reports_unpaired_files_and_errors(tmp_path, capsys):
    write_squares(tmp_path / "pred", tmp_path / "gt")
    tifffile.imwrite(tmp_path / "pred" / "extra_labels.tif", np.zeros((40, 40), np.int32))
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt")]) == 0
    assert "1 prediction file(s) without a partner, skipped: extra" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", str(empty), str(tmp_path / "gt")]) == 2
    assert "No prediction" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing"), str(tmp_path / "gt")]) == 2
    assert "No such folder" in capsys.readouterr().err

    tifffile.imwrite(tmp_path / "pred" / "a_labels.tif", np.zeros((30, 40), np.int32))
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt")]) == 2
    assert "a: prediction (30, 40) and ground truth (40, 40) differ in shape" in capsys.readouterr().err


def test_evaluate_glas_folder_against_itself_and_a_degraded_copy(shared_data, tmp_path):
    train = shared_data / "glas" / "train"
    names = ["train_3", "train_4", "train_20"]
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    gts = {}
    for name in names:  # a GlaS-style folder: images next to their annotations
        shutil.copy(train / f"{name}.bmp", gt_dir)
        shutil.copy(train / f"{name}_anno.bmp", gt_dir)
        gts[name] = read_labels(train / f"{name}_anno.bmp")
        tifffile.imwrite(pred_dir / f"{name}_labels.tif", np.roll(gts[name], 5, axis=1))

    assert main(["evaluate", str(gt_dir), str(gt_dir), "--json", str(tmp_path / "self.json")]) == 0
    perfect = json.loads((tmp_path / "self.json").read_text())["pooled"]
    assert (perfect["object_f1"], perfect["object_dice"], perfect["object_hausdorff"]) == (1.0, 1.0, 0.0)

    assert main(["evaluate", str(pred_dir), str(gt_dir), "--json", str(tmp_path / "shift.json")]) == 0
    shifted = json.loads((tmp_path / "shift.json").read_text())
    expected = object_scores([match_objects(np.roll(gts[n], 5, axis=1), gts[n]) for n in names])
    for key in ("object_f1", "object_dice", "object_hausdorff", "tp", "fp", "fn"):
        assert shifted["pooled"][key] == pytest.approx(expected[key]), key
    assert shifted["pooled"]["object_dice"] < 1 and shifted["pooled"]["object_hausdorff"] >= 5
