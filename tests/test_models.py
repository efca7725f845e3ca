"""Every semantic (contour-aware) architecture: shapes, gradients, a short fit, save/load,
tiled inference. Mask R-CNN, which predicts instances, has its own file (test_mask_rcnn.py).

Networks are built with tiny widths so the whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glas_seg.backend.checkpoint import ModelConfig, save_model
from glas_seg.backend.inference import predict_probabilities, size_multiple
from glas_seg.backend.models import ARCHITECTURES, INSTANCE_ARCHITECTURES, build_architecture
from glas_seg.backend.models.kidney_segnet import DiCE
from glas_seg.backend.registry import LoadedModel, load_model
from glas_seg.backend.targets import contour_targets
from glas_seg.backend.training import TrainSettings, training_loss

TINY = {
    "unet": {"width": 4, "depth": 3},
    "unet_plus_plus": {"width": 4, "depth": 3},
    "residual_unet": {"width": 4, "depth": 3},
    "kidney_segnet": {"width": 6},
    "micronet": {"width": 2},
}
# The hand-written seed architectures; efficientnet_unet (smp) has its own file.
NAMES = sorted(TINY)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_architecture(name, **{**TINY.get(name, {}), **extra})


def disks(size: int = 64, count: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright disks on a dark background and their contour targets: ``(N, 3, S, S)``, ``(N, S, S)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, targets = [], []
    for _ in range(count):
        labels = np.zeros((size, size), np.int32)
        for k in range(1, 4):
            cy, cx = rng.integers(12, size - 12, 2)
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(6, 11) ** 2] = k
        image = np.where(labels > 0, 1.0, -1.0) + 0.2 * rng.standard_normal((size, size))
        images.append(np.repeat(image[None], 3, axis=0))
        targets.append(contour_targets(labels).astype(np.int64))
    return torch.tensor(np.stack(images), dtype=torch.float32), torch.tensor(np.stack(targets))


def loss_of(network: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return training_loss(network(images), targets, TrainSettings())


def test_registry_lists_the_issue_6_architectures():
    assert {"unet", "unet_plus_plus", "residual_unet", "kidney_segnet", "micronet", "mask_rcnn"} <= set(ARCHITECTURES)
    for name in ARCHITECTURES:
        assert getattr(tiny(name), "predicts_instances", False) == (name in INSTANCE_ARCHITECTURES), name


@pytest.mark.parametrize("name", NAMES)
def test_eval_output_has_input_size_for_odd_sizes(name):
    network = tiny(name).eval()
    assert size_multiple(network) >= 1
    with torch.no_grad():
        out = network(torch.randn(1, 3, 97, 131))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 3, 97, 131)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
@pytest.mark.parametrize("name", NAMES)
def test_every_normalisation_builds_and_runs(name, norm):
    network = tiny(name, norm=norm).eval()
    with torch.no_grad():
        assert network(torch.randn(1, 3, 33, 47)).shape == (1, 3, 33, 47)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_step(name):
    network = tiny(name).train()
    images, targets = disks(size=48)
    output = network(images)
    if isinstance(output, dict):
        assert output["out"].shape == (2, 3, 48, 48)
        for aux in output["aux"]:
            assert aux.shape[:2] == (2, 3)
    else:
        assert output.shape == (2, 3, 48, 48)
    loss = training_loss(output, targets, TrainSettings())
    assert torch.isfinite(loss)
    loss.backward()
    params = [p for p in network.parameters() if p.requires_grad]
    missing = [n for n, p in network.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in params)
    before = [p.detach().clone() for p in params]
    torch.optim.SGD(params, lr=0.1).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.parametrize("name", NAMES)
def test_short_training_lowers_the_loss(name):
    network = tiny(name).train()
    images, targets = disks(size=48)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)

    def measured() -> float:
        torch.manual_seed(1)  # same dropout masks for both measurements
        with torch.no_grad():
            return loss_of(network, images, targets).item()

    initial = measured()
    for _ in range(15):
        optimizer.zero_grad()
        loss_of(network, images, targets).backward()
        optimizer.step()
    final = measured()
    print(f"{name}: loss {initial:.3f} -> {final:.3f}")
    assert final < 0.8 * initial, (initial, final)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_through_registry(name, tmp_path):
    network = tiny(name).train()
    with torch.no_grad():  # move batch-norm statistics away from their initial values
        network(disks(size=32)[0])
    network.eval()
    config = ModelConfig(name=f"tiny-{name}", architecture=name, arch_kwargs=TINY.get(name, {}), scale=1.0)
    path = save_model(tmp_path / f"tiny-{name}.safetensors", network, config)
    loaded = load_model(path, device="cpu")
    assert loaded.config.architecture == name
    x = torch.randn(1, 3, 45, 70)
    with torch.no_grad():
        assert torch.equal(network(x), loaded.network(x))


@pytest.mark.parametrize("name", NAMES)
def test_tiled_inference_runs(name):
    network = tiny(name).eval()
    model = LoadedModel(network, ModelConfig(name="t", architecture=name, scale=1.0, tile_size=64), torch.device("cpu"))
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    probabilities = predict_probabilities(model, image)
    assert probabilities.shape == (3, 70, 90)
    np.testing.assert_allclose(probabilities.sum(0), 1, atol=1e-4)


# -- U-Net++ modes ------------------------------------------------------------------------


def test_unet_plus_plus_accurate_and_fast_modes():
    network = tiny("unet_plus_plus").eval()
    x = torch.randn(1, 3, 50, 37)
    with torch.no_grad():
        network.train(False)
        nodes = network._top_nodes(x, network.depth)
        heads = [h(n) for h, n in zip(network.heads, nodes)]
        accurate = network.set_mode("accurate")(x)
        mean_probs = torch.stack([h.softmax(1) for h in heads]).mean(0)
        torch.testing.assert_close(accurate.softmax(1), mean_probs)
        assert network.size_multiple == 2**network.depth
        for level in range(1, network.depth + 1):
            fast = network.set_mode("fast", level)(x)
            assert fast.shape == (1, 3, 50, 37)
            assert network.size_multiple == 2**level
            torch.testing.assert_close(fast, heads[level - 1])
    assert network.mode == "fast" and network.prune_level == network.depth
    network.mode = "accurate"
    assert network.mode == "accurate"
    with pytest.raises(ValueError):
        network.set_mode("quick")
    with pytest.raises(ValueError):
        network.set_mode("fast", network.depth + 1)


def test_unet_plus_plus_fast_mode_skips_deeper_nodes():
    network = tiny("unet_plus_plus", mode="fast", prune_level=1).eval()
    called = set()
    for i, level in enumerate(network.nodes):
        for j, node in enumerate(level):
            node.register_forward_hook(lambda *_, key=(i, j): called.add(key))
    with torch.no_grad():
        network(torch.randn(1, 3, 32, 32))
    assert called == {(0, 0), (1, 0), (0, 1)}


def test_unet_plus_plus_trains_every_head_and_mode_switches_on_a_loaded_model(tmp_path):
    network = tiny("unet_plus_plus", mode="fast", prune_level=2).train()
    output = network(torch.randn(2, 3, 32, 32))
    assert len(output["aux"]) == network.depth  # training ignores the inference mode
    config = ModelConfig(name="upp", architecture="unet_plus_plus",
                         arch_kwargs={**TINY["unet_plus_plus"], "mode": "fast", "prune_level": 2})
    loaded = load_model(save_model(tmp_path / "upp.safetensors", network.eval(), config), device="cpu")
    assert (loaded.network.mode, loaded.network.prune_level) == ("fast", 2)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        fast = loaded.network(x)
        accurate = loaded.network.set_mode("accurate")(x)
    assert fast.shape == accurate.shape and not torch.equal(fast, accurate)


# -- Micro-Net checkpointing and Kidney-SegNet's DiCE ---------------------------------------


def test_micronet_checkpointing_gives_the_same_gradients():
    images, targets = disks(size=48)
    grads = []
    for checkpointing in (False, True):
        network = tiny("micronet", checkpointing=checkpointing).train()
        torch.manual_seed(3)
        loss_of(network, images, targets).backward()
        grads.append([p.grad for p in network.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_micronet_auxiliary_outputs_have_the_input_size():
    output = tiny("micronet").train()(torch.randn(1, 3, 45, 61))
    assert output["out"].shape == (1, 3, 45, 61)
    assert [a.shape for a in output["aux"]] == [(1, 3, 45, 61)] * 3


@pytest.mark.parametrize("dilation", [1, 2, 8])
def test_dice_channel_stack_reads_neighbouring_channels(dilation):
    unit = DiCE(5, 5, kernel_size=3, dilation=dilation)
    x = torch.randn(2, 5, 3, 4)
    stack = unit._channel_stack(x).view(2, 5, 3, 3, 4)
    for c in range(5):
        for i, shift in enumerate((-dilation, 0, dilation)):
            expected = x[:, c + shift] if 0 <= c + shift < 5 else torch.zeros_like(x[:, 0])
            assert torch.equal(stack[:, c, i], expected)


def test_dice_parameters_do_not_depend_on_the_input_size():
    unit = DiCE(8, 16).eval()
    n_params = sum(p.numel() for p in unit.parameters())
    with torch.no_grad():
        for size in [(9, 13), (40, 31)]:
            assert unit(torch.randn(1, 8, *size)).shape == (1, 16, *size)
    assert n_params == sum(p.numel() for p in unit.parameters())
