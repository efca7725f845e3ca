import subprocess
import sys

import numpy as np
import tifffile
from skimage import io as skio

from glas_seg.cli import main

SAMPLE = "src/glas_seg/sample_data/glas_train_12.png"


def _write_pairs(folder, circles=((25, 25, 12), (30, 70, 12), (70, 45, 12))) -> None:
    """Four 96 x 96 image/label pairs (MoNuSeg layout) of bright discs (cy, cx, r) on a dark ground."""
    yy, xx = np.mgrid[:96, :96]
    for k in range(4):
        labels = np.zeros((96, 96), np.uint16)
        for i, (cy, cx, r) in enumerate(circles, start=1):
            labels[(yy - cy - 3 * k) ** 2 + (xx - cx) ** 2 <= r * r] = i
        image = np.where(labels[..., None] > 0, 200, 60).astype(np.uint8).repeat(3, axis=2)
        skio.imsave(folder / f"img{k}.png", image, check_contrast=False)
        tifffile.imwrite(folder / f"img{k}_label.tif", labels)


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


def test_train_mask_rcnn_on_a_pairs_folder_then_segment(tmp_path, capsys):
    """`train --model mask_rcnn` on an image/label folder (MoNuSeg layout), then `segment` with it."""
    _write_pairs(tmp_path)
    model_file = tmp_path / "m.safetensors"
    argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--model", "mask_rcnn",
            "--arch-kwargs", '{"fpn_channels": 16, "anchor_size": 8}', "--name", "m", "--task", "nuclei",
            "--scale", "1", "--iterations", "2", "--eval-every", "2", "--batch-size", "2", "--crop-size", "64",
            "--min-size", "10", "--tile-size", "64", "--device", "cpu", "--export", str(model_file)]
    assert main(argv) == 0
    assert "3 training and 1 validation images" in capsys.readouterr().err
    code = main(["segment", str(tmp_path / "img0.png"), "--out", str(tmp_path / "o"), "--model", str(model_file), "--tta"])
    assert code == 2 and "--tta does not apply to mask_rcnn" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "img0.png"), "--out", str(tmp_path / "o"), "--model", str(model_file)]) == 0
    assert tifffile.imread(tmp_path / "o" / "img0_labels.tif").shape == (96, 96)


def test_train_can_choose_the_smallest_object_on_its_training_images(tmp_path, capsys):
    """`train --choose-min-size` validates with the size chosen on the training images and writes it
    into the exported model; detection models refuse the option before training. ``--gap-weight``
    reaches the training settings; a bad ``--gap-radius`` is refused."""
    from glas_seg.backend.registry import load_model

    _write_pairs(tmp_path, ((25, 25, 12), (30, 70, 10), (70, 45, 14)))
    common = ["--data", str(tmp_path), "--task", "nuclei", "--scale", "1", "--iterations", "2", "--eval-every", "2",
              "--batch-size", "2", "--crop-size", "64", "--min-size", "10", "--tile-size", "64", "--device", "cpu",
              "--choose-min-size"]
    code = main(["train", "--out", str(tmp_path / "det"), "--model", "mask_rcnn", *common])
    assert code == 2 and "no watershed size to choose" in capsys.readouterr().err
    assert not (tmp_path / "det").exists()
    code = main(["train", "--out", str(tmp_path / "bad"), "--model", "unet", *common, "--gap-radius", "0"])
    assert code == 2 and "gap radius" in capsys.readouterr().err
    model_file = tmp_path / "m.safetensors"
    assert main(["train", "--out", str(tmp_path / "run"), "--model", "unet", "--arch-kwargs", '{"width": 4, "depth": 2}',
                 "--name", "m", *common, "--gap-weight", "5", "--loader-workers", "1", "--encoder-lr-factor", "0.5",
                 "--augment-strength", "1.5", "--export", str(model_file)]) == 0
    assert "chosen on the 3 training images" in capsys.readouterr().err
    config = load_model(model_file, "cpu").config
    choice = config.training["min_size_choice"]
    assert config.min_size == choice["min_size"] and choice["min_size"] in {row["min_size"] for row in choice["table"]}
    assert [row["min_size"] for row in choice["table"]] == [10, 20, 30, 40, 50, 60, 75]
    # Validated with the chosen size: the recorded validation is that of the model as it segments.
    import json
    run_state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert run_state["state"]["history"][-1]["min_size"] == choice["min_size"]
    assert run_state["settings"]["gap_weight"] == 5  # --gap-weight reached the training settings
    assert run_state["settings"]["loader_workers"] == 1  # and --loader-workers
    assert run_state["settings"]["encoder_lr_factor"] == 0.5  # and --encoder-lr-factor
    assert run_state["settings"]["augment_strength"] == 1.5  # and --augment-strength


def test_train_can_start_from_a_trained_model(tmp_path, capsys):
    """`train --init MODEL` starts from that model's weights (not random, not ImageNet's), records
    which file it was, and refuses a model of another shape before anything is written."""
    import json

    from glas_seg.backend.checkpoint import config_replace, file_sha256, load_state, read_config, save_model
    from glas_seg.backend.registry import build_network

    _write_pairs(tmp_path)
    common = ["--data", str(tmp_path), "--model", "unet", "--task", "nuclei", "--scale", "1", "--iterations", "1",
              "--eval-every", "1", "--batch-size", "2", "--crop-size", "64", "--min-size", "10", "--tile-size", "64",
              "--device", "cpu"]
    first = tmp_path / "first.safetensors"
    assert main(["train", "--out", str(tmp_path / "a"), *common, "--arch-kwargs", '{"width": 4, "depth": 2}',
                 "--lr", "1e-2", "--export", str(first)]) == 0
    code = main(["train", "--out", str(tmp_path / "b"), *common, "--arch-kwargs", '{"width": 8, "depth": 2}',
                 "--init", str(first)])
    assert code == 2 and "cannot start this run: arch_kwargs" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    code = main(["train", "--out", str(tmp_path / "b"), *common, "--init", "no-such-model"])
    assert code == 2 and "No model named 'no-such-model'" in capsys.readouterr().err

    second = tmp_path / "second.safetensors"
    assert main(["train", "--out", str(tmp_path / "c"), *common, "--arch-kwargs", '{"width": 4, "depth": 2}',
                 "--lr", "1e-9", "--seed", "1", "--init", str(first), "--export", str(second)]) == 0
    start, _ = load_state(first)
    end, config = load_state(second)
    learned = [k for k in start if "running" not in k and "num_batches" not in k]
    # One step at a learning rate of 1e-9 leaves the starting weights where they were.
    assert max(float((end[k] - start[k]).abs().max()) for k in learned) < 1e-3
    assert config.training["initialised_from"] == {"model": "first", "sha256": file_sha256(first)}
    run = json.loads((tmp_path / "c" / "state.json").read_text())
    assert run["state"]["iteration"] == 1
    assert config.training["loader_workers"] == 0  # the resolved count, on which the batches depend

    # Resumed (more iterations): --init is left aside and the record stays the first command's.
    capsys.readouterr()
    longer = ["2" if i and common[i - 1] == "--iterations" else x for i, x in enumerate(common)]
    assert main(["train", "--out", str(tmp_path / "c"), *longer, "--arch-kwargs", '{"width": 4, "depth": 2}',
                 "--lr", "1e-9", "--seed", "1", "--init", "no-such-model"]) == 0
    assert "left aside" in capsys.readouterr().err
    resumed = read_config(tmp_path / "c" / "last.safetensors")
    assert resumed.training["iterations"] == 2 and resumed.training["initialised_from"]["model"] == "first"
    # A learning rate the saved optimizer would override is refused, before anything is read.
    code = main(["train", "--out", str(tmp_path / "c"), *common, "--arch-kwargs", '{"width": 4, "depth": 2}',
                 "--lr", "1e-3", "--seed", "1"])
    assert code == 2 and "learning_rate 1e-09 -> 0.001" in capsys.readouterr().err

    # The starting model's input normalisation comes with its weights.
    other = tmp_path / "other.safetensors"
    network = build_network(read_config(first), start)
    save_model(other, network, config_replace(read_config(first), mean=(0.4, 0.4, 0.4), std=(0.3, 0.3, 0.3)))
    third = tmp_path / "third.safetensors"
    assert main(["train", "--out", str(tmp_path / "d"), *common, "--arch-kwargs", '{"width": 4, "depth": 2}',
                 "--init", str(other), "--export", str(third)]) == 0
    assert tuple(read_config(third).mean) == (0.4, 0.4, 0.4) and tuple(read_config(third).std) == (0.3, 0.3, 0.3)
    longer = ["2" if i and common[i - 1] == "--iterations" else x for i, x in enumerate(common)]
    assert main(["train", "--out", str(tmp_path / "d"), *longer, "--arch-kwargs", '{"width": 4, "depth": 2}',
                 "--export", str(third)]) == 0  # resumed without --init: the normalisation stays the run's
    last = read_config(tmp_path / "d" / "last.safetensors")
    assert tuple(last.mean) == (0.4, 0.4, 0.4) and last.training["iterations"] == 2
