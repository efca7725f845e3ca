"""Helpers shared by test_bad_input.py and test_bad_input_property.py: tiny models, tiny images,
model files with a hand-edited configuration, and the CLI run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
import torch
from safetensors.torch import save_file
from skimage.io import imsave

from glas_seg.backend.batch import MANIFEST_NAME
from glas_seg.backend.checkpoint import METADATA_KEY, ModelConfig, save_model
from glas_seg.backend.registry import build_model, user_model_dir
from glas_seg.cli import main

TINY = {"width": 4, "depth": 2}


def tiny_config(**changes) -> ModelConfig:
    """A 2-level, 4-channel U-Net at full resolution: builds and runs in milliseconds."""
    values = dict(name="tiny", architecture="unet", arch_kwargs=TINY, scale=1.0, tile_size=64, min_size=10)
    values.update(changes)
    return ModelConfig(**values)


def tiny_model(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = tiny_config(name=Path(path).stem)
    return save_model(path, build_model(config), config)


def tiny_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in build_model(tiny_config()).state_dict().items()}


def edited_model(path: Path, config_text: str | None = None, tensors: dict | None = None, **changes) -> Path:
    """A model file whose stored configuration JSON is ``config_text`` or the tiny one with ``changes``.

    Written with safetensors directly, as a hand-edited or foreign file would be: nothing here
    goes through glas-seg's own (validating) writers.
    """
    if config_text is None:
        data = json.loads(tiny_config(name=Path(path).stem).to_json())
        data.update(changes)
        config_text = json.dumps(data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_tensors() if tensors is None else tensors, str(path), metadata={METADATA_KEY: config_text})
    return path


def glands_image(seed: int = 0, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like uint8 RGB image with three disc 'glands', and their instance labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    for i in range(1, 4):
        cy, cx = rng.integers(12, size - 12, 2)
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 < 64) & (labels == 0)] = i
    image = np.where(labels[..., None] > 0, [120, 70, 150], [230, 180, 200]).astype(np.uint8)
    return image, labels


def write_image(path: Path, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, glands_image(seed)[0], check_contrast=False)
    return path


def write_pairs(folder: Path, count: int = 3) -> Path:
    """``X.png`` + ``X_label.tif`` pairs, the MoNuSeg layout ``train`` and ``finetune`` read."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        image, labels = glands_image(k)
        imsave(folder / f"img{k}.png", image, check_contrast=False)
        tifffile.imwrite(folder / f"img{k}_label.tif", labels)
    return folder


def cli(capsys, *argv) -> tuple[int, str]:
    """Run ``glas-seg`` in-process; returns (exit code, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """Exit 2 with exactly one ``glas-seg: error:`` line holding every fragment, and no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("glas-seg: error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def store_files() -> list[str]:
    folder = user_model_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def tree(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative paths), hidden temporary files included, except the
    batch manifest ``segment`` keeps there (its temporary files are listed)."""
    folder = Path(folder)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []
    return [f for f in files if f != MANIFEST_NAME]
