"""Mask R-CNN: targets, shapes, gradients, a short fit, save/load, training and tiled segmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glas_seg.backend.checkpoint import ModelConfig, save_model
from glas_seg.backend.data import PatchDataset, Sample
from glas_seg.backend.image_io import read_image
from glas_seg.backend.inference import segment
from glas_seg.backend.models import build_architecture
from glas_seg.backend.models.mask_rcnn import MIN_TARGET_PIXELS, instance_targets
from glas_seg.backend.registry import LoadedModel, load_model
from glas_seg.backend.training import TrainSettings, train

SAMPLE = "src/glas_seg/sample_data/glas_train_12.png"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def network(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_architecture("mask_rcnn", **{"fpn_channels": 16, "anchor_size": 8, **kwargs})


def disk_scene(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three bright disks on a dark noisy background: image ``(S, S, 3)`` in [0, 1], labels ``(S, S)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int64)
    for k, (cy, cx) in enumerate([(16, 16), (16, 46), (46, 30)], start=1):
        cy, cx = cy * size // 64 + rng.integers(-3, 4), cx * size // 64 + rng.integers(-3, 4)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 8) ** 2] = k
    image = np.clip(np.where(labels > 0, 0.8, 0.2) + 0.05 * rng.standard_normal((size, size)), 0, 1)
    return np.repeat(image[..., None], 3, axis=2).astype(np.float32), labels


def batch(count: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = [disk_scene(size, seed) for seed in range(count)]
    images = torch.tensor(np.stack([(s[0] - 0.5) / 0.25 for s in scenes])).permute(0, 3, 1, 2)
    return images.contiguous(), torch.tensor(np.stack([s[1] for s in scenes]))


def test_instance_targets_give_exact_boxes_and_drop_slivers_and_ignored_pixels():
    labels = torch.zeros(40, 50, dtype=torch.int64)
    labels[2:12, 5:9] = 3
    labels[20:30, 20:45] = 7
    labels[39, 0:MIN_TARGET_PIXELS - 1] = 9  # a sliver
    labels[0:2, :] = -1
    targets = instance_targets(labels)
    assert targets["boxes"].tolist() == [[5, 2, 9, 12], [20, 20, 45, 30]]
    assert targets["labels"].tolist() == [1, 1]
    assert targets["masks"].shape == (2, 40, 50) and targets["masks"].dtype == torch.uint8
    assert targets["masks"][0].sum() == 40 and targets["masks"][1].sum() == 250
    empty = instance_targets(torch.zeros(8, 8, dtype=torch.int64))
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 8, 8)


def test_eval_detections_have_the_input_size_for_odd_sizes():
    net = network(score_threshold=0.0).eval()
    with torch.no_grad():
        (found,) = net(torch.randn(1, 3, 97, 131))
    assert set(found) >= {"boxes", "scores", "masks"}
    assert found["masks"].shape[1:] == (1, 97, 131)
    assert len(found["scores"]) > 0 and torch.isfinite(found["masks"]).all()


def test_pyramid_strides_do_not_depend_on_the_first_image_size():
    net = network(score_threshold=0.0).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        net(torch.randn(1, 3, 45, 70))  # torchvision alone would infer wrong strides from this one
        first = net(x)[0]
        fresh = network(score_threshold=0.0).eval()
        second = fresh(x)[0]
    assert torch.equal(first["boxes"], second["boxes"])


def test_training_mode_needs_instance_labels():
    with pytest.raises(ValueError, match="instance labels"):
        network().train()(torch.randn(1, 3, 32, 32))


def test_gradient_step_reaches_backbone_and_heads():
    net = network().train()
    images, labels = batch()
    output = net(images, labels)
    assert {"loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(output)
    assert torch.isfinite(output["loss"])
    output["loss"].backward()
    parts = {"detector.backbone.body": False, "detector.backbone.fpn": False, "detector.rpn": False,
             "detector.roi_heads.box": False, "detector.roi_heads.mask": False}
    for name, param in net.named_parameters():
        for part in parts:
            if name.startswith(part) and param.grad is not None and param.grad.abs().sum() > 0:
                parts[part] = True
    assert all(parts.values()), parts


def test_ignored_pixels_blank_the_image_and_count_as_background():
    net = network().train()
    images, labels = batch(count=1)
    ignored = labels.clone()
    ignored[:, :, :32] = -1  # left half unknown: its disks must not be targets
    seen = {}
    net.detector.forward = lambda imgs, targets: seen.update(images=imgs, targets=targets) or {"l": torch.zeros(())}
    net(images, ignored)
    assert torch.all(seen["images"][0][:, :, :32] == 0)
    assert torch.all(seen["targets"][0]["boxes"][:, 0] >= 32)


def test_short_training_lowers_the_loss():
    net = network().train()
    images, labels = batch()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)

    def measured() -> float:
        torch.manual_seed(1)  # same RPN / RoI sampling for both measurements
        with torch.no_grad():
            return net(images, labels)["loss"].item()

    initial = measured()
    for _ in range(25):
        optimizer.zero_grad()
        net(images, labels)["loss"].backward()
        optimizer.step()
    final = measured()
    assert final < 0.7 * initial, (initial, final)


def test_save_load_round_trip_through_registry(tmp_path):
    net = network(score_threshold=0.0).train()
    with torch.no_grad():
        net(*batch())  # move batch-norm statistics away from their initial values
    config = ModelConfig(name="tiny-mrcnn", architecture="mask_rcnn", scale=1.0,
                         arch_kwargs={"fpn_channels": 16, "anchor_size": 8, "score_threshold": 0.0})
    loaded = load_model(save_model(tmp_path / "tiny-mrcnn.safetensors", net.eval(), config), device="cpu")
    assert loaded.network.predicts_instances
    x = torch.randn(1, 3, 45, 70)
    with torch.no_grad():
        a, b = net(x)[0], loaded.network(x)[0]
    assert len(a["scores"]) > 0
    for key in ("boxes", "scores", "masks"):
        assert torch.equal(a[key], b[key])


def test_patch_dataset_yields_instance_ids_for_instance_networks():
    image, labels = disk_scene(96)
    stream = iter(PatchDataset([Sample("s", image, labels)], 64, (0.5,) * 3, (0.25,) * 3, augment=False,
                               targets="instances"))
    _, target = next(stream)
    assert target.dtype == torch.int64 and target.shape == (64, 64)
    assert set(torch.unique(target).tolist()) <= {-1, 0, 1, 2, 3} and target.max() >= 1
    with pytest.raises(ValueError, match="targets"):
        PatchDataset([Sample("s", image, labels)], 64, (0.5,) * 3, (0.25,) * 3, targets="boxes")


def test_train_runs_mask_rcnn_and_keeps_a_loadable_best_model(tmp_path):
    samples = [Sample(f"s{seed}", *disk_scene(96, seed)) for seed in range(3)]
    config = ModelConfig(name="mrcnn", architecture="mask_rcnn", scale=1.0, tile_size=96, min_size=20,
                         arch_kwargs={"fpn_channels": 16, "anchor_size": 8})
    settings = TrainSettings(iterations=4, eval_every=2, batch_size=2, crop_size=64, warmup=1, device="cpu")
    events = []
    model, state = train(config, settings, samples[:2], samples[2:], tmp_path / "run", progress=events.append)
    assert state.iteration == 4 and all(np.isfinite(e["loss"]) for e in events)
    assert [e["iteration"] for e in events if "object_f1" in e] == [2, 4]
    best = load_model(tmp_path / "run" / "best.safetensors", device="cpu")
    assert best.config.architecture == "mask_rcnn"
    assert segment(best, samples[2].image).labels.shape == (96, 96)


def test_segment_sample_image_with_tiles_and_stitching():
    config = ModelConfig(name="m", architecture="mask_rcnn", arch_kwargs={"score_threshold": 0.0}, tile_size=128)
    model = LoadedModel(build_architecture("mask_rcnn", score_threshold=0.0).eval(), config, torch.device("cpu"))
    image = read_image(SAMPLE)
    steps = []
    result = segment(model, image, progress=lambda done, total: steps.append((done, total)))
    assert result.labels.shape == image.shape[:2] and result.labels.dtype == np.int32
    assert result.labels.max() > 0  # an untrained detector with no score cut still finds boxes
    assert np.array_equal(np.unique(result.labels), np.arange(result.labels.max() + 1))
    assert result.probabilities.shape == (2, 216, 287)
    assert 0 <= result.foreground.min() and result.foreground.max() <= 1
    assert steps[-1][0] == steps[-1][1] > 1  # several tiles at tile size 128
    with pytest.raises(ValueError, match="test-time augmentation"):
        segment(model, image, tta=True)


def test_finetune_a_mask_rcnn_model_with_a_corrected_region(tmp_path):
    from glas_seg.backend.finetune import FinetuneSettings, finetune

    torch.manual_seed(0)
    config = ModelConfig(name="mrcnn-base", architecture="mask_rcnn", scale=1.0, tile_size=96, min_size=20,
                         arch_kwargs={"fpn_channels": 16, "anchor_size": 8})
    base = save_model(tmp_path / "mrcnn-base.safetensors", build_architecture("mask_rcnn", **config.arch_kwargs), config)
    sample = Sample("s", *disk_scene(96))
    region = np.zeros((96, 96), bool)
    region[:, :60] = True
    settings = FinetuneSettings(iterations=2, batch_size=2, crop_size=64, eval_every=2, device="cpu")
    result = finetune(str(base), [sample], "mrcnn-clinic", settings, valid_masks=[region])
    loaded = load_model("mrcnn-clinic", "cpu")
    assert loaded.config.architecture == "mask_rcnn" and loaded.config.base_model == "mrcnn-base"
    assert result.entry.source == "user"
    assert segment(loaded, sample.image).labels.shape == (96, 96)


def test_efficientnet_backbone_starts_from_imagenet_with_frozen_batch_norm(one_torch_thread):
    from glas_seg.backend.models import pretrained_encoder_state

    network = build_architecture("mask_rcnn", backbone="efficientnet_lite0", fpn_channels=16)
    state = pretrained_encoder_state("mask_rcnn", network)
    assert state and all(k.startswith("detector.backbone.body.") for k in state)
    assert not network.load_state_dict(state, strict=False).unexpected_keys
    # Frozen batch norm: no trainable scale/shift and statistics that training does not move.
    norm = network.detector.backbone.body.bn1
    assert not any(p.requires_grad for p in norm.parameters(recurse=False))
    before = norm.running_mean.clone()
    network.train()
    images = torch.randn(2, 3, 64, 64)
    labels = torch.zeros(2, 64, 64, dtype=torch.int64)
    labels[:, 10:30, 10:30] = 1
    loss = network(images, labels)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(norm.running_mean, before)
    network.eval()
    with torch.no_grad():
        assert isinstance(network(images), list)
    # The from-scratch ResNet has no pretrained weights.
    assert pretrained_encoder_state("mask_rcnn", build_architecture("mask_rcnn", fpn_channels=16)) is None
