"""The pretrained-encoder architecture: its ImageNet weights are the real ones, pinned by hash,
and training starts from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from glas_seg.backend.checkpoint import ModelConfig
from glas_seg.backend.errors import GlasSegError
from glas_seg.backend.data import Sample
from glas_seg.backend.inference import predict_probabilities
from glas_seg.backend.models import ARCHITECTURES, build_architecture, get_architecture, pretrained_encoder_state
from glas_seg.backend.models.efficientnet_unet import IMAGENET_WEIGHTS, imagenet_classifier_state, imagenet_weights_path
from glas_seg.backend.registry import LoadedModel
from glas_seg.backend.training import TrainSettings, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.parametrize(("encoder", "size"), [("lite0", 224), ("lite2", 260)])
def test_imagenet_weights_are_pinned_and_label_a_cat_as_a_cat(encoder, size):
    import timm
    from skimage import data

    assert imagenet_weights_path(encoder).name == IMAGENET_WEIGHTS[encoder]["file"].split("/")[-1]
    classifier = timm.create_model(f"tf_efficientnet_{encoder}", pretrained=False)
    classifier.load_state_dict(imagenet_classifier_state(encoder))
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float()
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = classifier.eval()((image - 127) / 128).softmax(1)[0].argmax().item()
    assert top in CAT_CLASSES


@pytest.mark.parametrize("encoder", ["lite0", "lite2"])
def test_encoder_state_covers_the_whole_encoder_and_nothing_else(encoder):
    network = build_architecture("efficientnet_unet", encoder=encoder)
    state = pretrained_encoder_state("efficientnet_unet", network)
    result = network.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(not k.startswith("net.encoder.") for k in result.missing_keys)
    assert any(k.startswith("net.decoder.") for k in result.missing_keys)


def test_unknown_encoder_is_refused_by_name():
    with pytest.raises(GlasSegError, match="lite0, lite2"):
        build_architecture("efficientnet_unet", encoder="lite9")


def test_drop_path_skips_encoder_blocks_in_training_only():
    plain = build_architecture("efficientnet_unet", decoder_channels=(16, 16, 8, 8, 8))
    dropping = build_architecture("efficientnet_unet", decoder_channels=(16, 16, 8, 8, 8), drop_path=0.3)
    assert plain.state_dict().keys() == dropping.state_dict().keys()  # the same file either way
    dropping.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dropping.eval()(x), plain.eval()(x))
        torch.manual_seed(0)
        assert not torch.allclose(dropping.train()(x), plain.train()(x))
    with pytest.raises(GlasSegError, match="drop_path"):
        build_architecture("efficientnet_unet", drop_path=1.0)


def test_registry_facts():
    spec = get_architecture("efficientnet_unet")
    assert not spec.predicts_instances and spec.pretrained_encoder
    assert spec.input_mean == pytest.approx((127 / 255,) * 3)
    assert all(a.builder.count(":") == 1 for a in ARCHITECTURES.values())
    # Seed architectures have no ImageNet weights: training them starts from random ones.
    assert pretrained_encoder_state("unet", build_architecture("unet")) is None


def test_tiled_inference_on_an_odd_sized_image():
    network = build_architecture("efficientnet_unet", decoder_channels=(16, 16, 8, 8, 8)).eval()
    config = ModelConfig(name="t", architecture="efficientnet_unet", scale=1.0, tile_size=64,
                         arch_kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    probs = predict_probabilities(LoadedModel(network, config, torch.device("cpu")),
                                  np.random.default_rng(0).uniform(size=(70, 101, 3)).astype(np.float32))
    assert probs.shape == (3, 70, 101) and np.allclose(probs.sum(0), 1, atol=1e-4)


def test_training_starts_from_the_imagenet_encoder(tmp_path, touching_squares):
    image = np.random.default_rng(0).uniform(size=(64, 64, 3)).astype(np.float32)
    config = ModelConfig(name="t", architecture="efficientnet_unet", scale=1.0, targets="inner",
                         arch_kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    settings = TrainSettings(iterations=1, eval_every=1, batch_size=1, crop_size=64, learning_rate=1e-9,
                             warmup=1, device="cpu", freeze_norm=True)
    model, _ = train(config, settings, [Sample("a", image, touching_squares)], [], tmp_path)
    weights = model.network.state_dict()
    for key, value in list(pretrained_encoder_state("efficientnet_unet", model.network).items())[:20]:
        if value.is_floating_point():
            assert torch.allclose(weights[key], value, atol=1e-5), key
