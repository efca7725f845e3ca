import json

import numpy as np
import pytest
import torch

from glas_seg.backend.checkpoint import ModelConfig, read_config
from glas_seg.backend.data import Sample
from glas_seg.backend.inference import Cancelled
from glas_seg.backend.training import TrainSettings, contour_loss, train


def disk_sample(seed, size=96):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    for i in range(1, 4):
        cy, cx, r = rng.integers(15, size - 15), rng.integers(15, size - 15), rng.integers(8, 14)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = i
    image = np.where(labels[..., None] > 0, [0.8, 0.3, 0.6], [0.95, 0.9, 0.95]).astype(np.float32)
    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    return Sample(f"s{seed}", np.clip(image, 0, 1), labels)


CONFIG = ModelConfig(name="t", architecture="unet", arch_kwargs={"width": 8, "depth": 2}, scale=1.0, min_size=20)


def test_loss_ignores_marked_pixels():
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    masked = target.clone()
    masked[:, :4] = -1
    changed = target.clone()
    changed[:, :4] = (changed[:, :4] + 1) % 3
    changed_masked = changed.clone()
    changed_masked[:, :4] = -1
    assert torch.isclose(contour_loss(logits, masked, 3, 1), contour_loss(logits, changed_masked, 3, 1))
    assert not torch.isclose(contour_loss(logits, target, 3, 1), contour_loss(logits, changed, 3, 1))


def test_short_training_lowers_loss_and_resumes(tmp_path):
    samples = [disk_sample(i) for i in range(3)]
    settings = TrainSettings(iterations=30, eval_every=15, batch_size=4, crop_size=64, learning_rate=5e-3, warmup=5)
    events = []
    _, state = train(CONFIG, settings, samples, samples[:1], tmp_path, progress=events.append)
    assert events[-1]["loss"] < events[0]["loss"]
    assert state.iteration == 30 and len(state.history) == 2
    assert (tmp_path / "best.safetensors").exists() and (tmp_path / "last.safetensors").exists()
    assert read_config(tmp_path / "best.safetensors").training["validation"]["pixel_dice"] >= 0
    # Resume: more iterations continue from 30, not from 0.
    settings.iterations = 35
    _, state = train(CONFIG, settings, samples, samples[:1], tmp_path)
    assert state.iteration == 35
    assert json.loads((tmp_path / "state.json").read_text())["state"]["iteration"] == 35


def test_cancel_keeps_last_checkpoint(tmp_path):
    samples = [disk_sample(0)]
    settings = TrainSettings(iterations=10, eval_every=2, batch_size=2, crop_size=64, warmup=1)
    seen = []

    def cancel():
        return len(seen) >= 3

    with pytest.raises(Cancelled):
        train(CONFIG, settings, samples, [], tmp_path, progress=seen.append, cancel=cancel)
    before = (tmp_path / "last.safetensors").read_bytes()
    assert read_config(tmp_path / "last.safetensors").training["iterations"] == 2
    assert before == (tmp_path / "last.safetensors").read_bytes()
