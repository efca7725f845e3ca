import json

import numpy as np
import pytest
import torch

from glas_seg.backend.checkpoint import ModelConfig, read_config
from glas_seg.backend.data import Sample
from glas_seg.backend.inference import Cancelled
from glas_seg.backend.registry import build_model
from glas_seg.backend.errors import GlasSegError
from glas_seg.backend.training import TrainSettings, contour_loss, gap_mask, make_optimizer, parameter_groups, train


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


def two_squares(gap):
    """Target map of two 10x10 objects side by side, ``gap`` background columns apart."""
    target = torch.zeros(1, 20, 40, dtype=torch.int64)
    target[0, 5:15, 5:15] = 1
    target[0, 5:15, 15 + gap:25 + gap] = 1
    return target


def test_gap_mask_marks_narrow_gaps_between_objects_only():
    narrow, wide = gap_mask(two_squares(4), radius=3), gap_mask(two_squares(10), radius=3)
    assert narrow[0, 5:15, 15:19].all()  # the whole 4-pixel gap
    assert narrow.sum() == 40  # and nothing else: no background around a convex object
    assert not wide.any()  # 10 pixels: wider than 2 * radius
    ignored = two_squares(4)
    ignored[0, :, 15:19] = -1
    assert not gap_mask(ignored, radius=3).any()  # ignored pixels are never weighted


def test_gap_weight_weighs_filling_a_gap_and_nothing_else():
    target = two_squares(4)
    fused = torch.full((1, 3, 20, 40), -5.0)
    fused[:, 0] = 5.0  # confident background everywhere...
    fused[0, :, 5:15, 5:29] = torch.tensor([-5.0, 5.0, -5.0])[:, None, None]  # ...but one object over both
    plain = contour_loss(fused, target, 3, 0)
    weighted = contour_loss(fused, target, 3, 0, gap_weight=5, gap_radius=3)
    assert weighted > 2 * plain  # the 40 gap pixels, all wrong, now weigh 6x
    separate = two_squares(8)  # objects further apart than the gap: no gap pixels
    logits = torch.randn(1, 3, 20, 40)
    assert torch.isclose(contour_loss(logits, separate, 3, 1), contour_loss(logits, separate, 3, 1, gap_weight=5, gap_radius=3))


@pytest.mark.parametrize("changes", [{"gap_weight": -1}, {"gap_radius": 0}, {"gap_radius": 2.5}])
def test_bad_gap_settings_are_refused(changes):
    with pytest.raises(GlasSegError, match="gap"):
        TrainSettings(**changes)


@pytest.mark.parametrize("workers", [-1, 1.5])
def test_bad_loader_workers_are_refused(workers):
    with pytest.raises(GlasSegError, match="loader workers"):
        TrainSettings(loader_workers=workers)


def test_training_with_loader_workers_runs_and_differs_from_one_process(tmp_path):
    """Two DataLoader workers feed the loop (each its own crops, so the run is not the
    one-process run): it trains, checkpoints and gives other weights than workers=0."""
    samples = [disk_sample(i) for i in range(3)]
    weights = []
    for workers in (0, 2):
        settings = TrainSettings(iterations=4, eval_every=4, batch_size=2, crop_size=48, warmup=1,
                                 loader_workers=workers, device="cpu")
        model, state = train(CONFIG, settings, samples, [], tmp_path / str(workers))
        assert state.iteration == 4 and (tmp_path / str(workers) / "last.safetensors").exists()
        weights.append(torch.cat([p.detach().flatten() for p in model.network.parameters()]))
    assert not torch.equal(weights[0], weights[1])


def test_encoder_learning_rate_factor_splits_the_parameters_once():
    network = build_model(CONFIG)
    names = {id(p): n for n, p in network.named_parameters()}
    assert len(parameter_groups(network, "unet", TrainSettings())) == 1  # old runs resume as they were
    rest, encoder = parameter_groups(network, "unet", TrainSettings(learning_rate=1e-3, encoder_lr_factor=0.1))
    assert "lr" not in rest and encoder["lr"] == pytest.approx(1e-4)
    assert all(names[id(p)].startswith("encoder.") for p in encoder["params"]) and encoder["params"]
    assert not any(names[id(p)].startswith("encoder.") for p in rest["params"]) and rest["params"]
    assert len(rest["params"]) + len(encoder["params"]) == len(names)
    with pytest.raises(GlasSegError, match="encoder learning-rate factor"):
        TrainSettings(encoder_lr_factor=0)


def test_sgd_moves_weights_in_proportion_to_their_gradients():
    """Adam steps every weight by about the learning rate, whatever its gradient; SGD does not."""
    moved = {}
    for name in ("adamw", "sgd"):
        weights = torch.nn.Parameter(torch.zeros(2))
        optimizer = make_optimizer([{"params": [weights]}], TrainSettings(optimizer=name, learning_rate=1e-2,
                                                                          weight_decay=0))
        (weights * torch.tensor([1.0, 1e-4])).sum().backward()  # one large gradient, one tiny
        optimizer.step()
        moved[name] = weights.detach().abs()
    assert isinstance(make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}],
                                     TrainSettings(optimizer="sgd")), torch.optim.SGD)
    assert moved["adamw"][1] > 0.5 * moved["adamw"][0]  # the tiny gradient moves almost as far
    assert moved["sgd"][1] < 1e-3 * moved["sgd"][0]
    with pytest.raises(GlasSegError, match="optimizer"):
        TrainSettings(optimizer="lbfgs")


def test_a_slower_encoder_moves_less(tmp_path):
    samples = [disk_sample(i) for i in range(2)]
    moved = []
    for factor in (1.0, 0.01):
        settings = TrainSettings(iterations=5, eval_every=5, batch_size=2, crop_size=48, warmup=1, device="cpu",
                                 encoder_lr_factor=factor)
        model, _ = train(CONFIG, settings, samples, [], tmp_path / str(factor))
        torch.manual_seed(settings.seed)  # as train() does before it builds the network
        start = dict(build_model(CONFIG).named_parameters())
        moved.append(sum((p.detach() - start[n].detach()).abs().sum().item()
                         for n, p in model.network.named_parameters() if n.startswith("encoder.")))
    assert moved[1] < 0.1 * moved[0]


def test_loader_workers_are_refused_under_torchrun_before_anything_is_written(tmp_path, monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    settings = TrainSettings(iterations=2, batch_size=2, crop_size=48, loader_workers=2, device="cpu")
    with pytest.raises(GlasSegError, match="single-process"):
        train(CONFIG, settings, [disk_sample(0)], [], tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_a_gpu_with_loader_workers(tmp_path):
    """The GPU path: workers chosen for the device, mixed precision, pinned batches."""
    samples = [disk_sample(i) for i in range(3)]
    settings = TrainSettings(iterations=6, eval_every=3, batch_size=4, crop_size=64, warmup=1, device="cuda")
    events = []
    model, state = train(CONFIG, settings, samples, samples[:1], tmp_path, progress=events.append)
    assert state.iteration == 6 and np.isfinite(events[-1]["loss"])
    assert next(model.network.parameters()).is_cuda and (tmp_path / "best.safetensors").exists()


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
