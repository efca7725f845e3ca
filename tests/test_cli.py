import subprocess
import sys

import numpy as np
import tifffile
from skimage import io as skio

from glas_seg.cli import main

SAMPLE = "src/glas_seg/sample_data/glas_train_12.png"


def test_help_documents_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    assert "segment" in out and "train" in out


def test_segment_writes_label_tiffs(tmp_path, capsys):
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / SAMPLE
    assert main(["segment", str(sample), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    labels = tifffile.imread(tmp_path / "out" / "glas_train_12_labels.tif")
    assert labels.shape == (433, 574) and labels.dtype.kind in "iu" and labels.max() >= 8


def test_segment_reports_bad_files_and_continues(tmp_path, capsys):
    skio.imsave(tmp_path / "tiny.png", np.zeros((8, 8, 3), np.uint8), check_contrast=False)
    good = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    skio.imsave(tmp_path / "ok.png", good, check_contrast=False)
    code = main(["segment", str(tmp_path / "tiny.png"), str(tmp_path / "ok.png"), "--out", str(tmp_path / "o")])
    assert code == 1
    assert "tiny.png" in capsys.readouterr().err
    assert (tmp_path / "o" / "ok_labels.tif").exists() and not (tmp_path / "o" / "tiny_labels.tif").exists()


def test_unknown_model_is_a_clean_error(tmp_path, capsys):
    code = main(["segment", "x.png", "--out", str(tmp_path), "--model", "nope"])
    assert code == 2 and "No model named 'nope'" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "glas_seg.cli", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--data" in out.stdout


def test_segment_mode_needs_a_model_with_modes(tmp_path, capsys):
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / SAMPLE
    code = main(["segment", str(sample), "--out", str(tmp_path), "--mode", "fast"])
    assert code == 2 and "has no inference modes" in capsys.readouterr().err
