"""The one registry of architectures: their builders and the facts the rest of the code needs.

Each architecture lives in its own module with one builder function. The registry names the
module and builder as strings and imports them only when a network is built, so that listing
models, the CLI's ``--help`` or a U-Net run never import torchvision's detection code (or
segmentation-models-pytorch). Adding an architecture touches its module and this table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ..errors import GlasSegError


@dataclass(frozen=True)
class Architecture:
    """Facts about one architecture.

    Attributes
    ----------
    name : str
        Registry key, stored in model files as ``ModelConfig.architecture``.
    builder : str
        ``"module:function"`` inside this package; the function takes keyword arguments only
        and returns an ``nn.Module`` with a ``size_multiple`` attribute (its total stride).
    predicts_instances : bool
        True for detectors (Mask R-CNN): training passes instance labels to ``forward`` and gets a
        loss back, inference gets instances and stitches them across tiles. False for pixel
        classifiers, which return background / interior / boundary logits.
    training_output : {"logits", "logits+aux", "loss"}
        What the network returns in training mode: logits, ``{"out": logits, "aux": [...]}``
        (deep supervision), or a ``{"loss": ...}`` dict (detectors).
    inference_modes : tuple of str
        Modes selectable after loading with ``network.set_mode`` (empty: none).
    pretrained_encoder : str or None
        ``"module:function"``: ``function(network)`` returns ImageNet weights for the network's
        encoder keyed as in its state dict, or None when this network (as its builder arguments
        made it) has no pretrained encoder. Applied before training from scratch, never at load
        time. None: the architecture always trains from random weights.
    input_mean, input_std : tuple of 3 floats or None
        Normalisation of RGB in ``[0, 1]`` the pretrained encoder expects (None: glas-seg's default).
    encoder_params, head_params : str
        Regular expressions (``re.match`` on state-dict names) for the encoder (backbone, up to
        the bottleneck) and the output layer(s); fine-tuning trains "all", everything but the
        encoder ("decoder") or only the head (``FinetuneSettings.layers``).
    paper : str
    """

    name: str
    builder: str
    predicts_instances: bool = False
    training_output: str = "logits"
    inference_modes: tuple[str, ...] = ()
    pretrained_encoder: str | None = None
    input_mean: tuple[float, float, float] | None = None
    input_std: tuple[float, float, float] | None = None
    encoder_params: str = r"encoder\."
    head_params: str = r"head\."
    paper: str = ""


_TABLE = (
    Architecture("unet", "unet:unet", paper="Ronneberger et al., MICCAI 2015"),
    Architecture("unet_plus_plus", "unet_plus_plus:unet_plus_plus", training_output="logits+aux",
                 inference_modes=("accurate", "fast"), encoder_params=r"nodes\.\d+\.0\.", head_params=r"heads\.",
                 paper="Zhou et al., DLMIA 2018"),
    Architecture("residual_unet", "residual_unet:residual_unet", paper="Alom et al., 2018 (R2U-Net)"),
    Architecture("kidney_segnet", "kidney_segnet:kidney_segnet", encoder_params=r"(stem|encoder)\.",
                 paper="Mehta et al., 2019 (Kidney-SegNet)"),
    Architecture("micronet", "micronet:micronet", training_output="logits+aux",
                 encoder_params=r"(encoder|bridge)\.", head_params=r"(aux_heads|head)\.",
                 paper="Raza et al., Medical Image Analysis 2019 (Micro-Net)"),
    Architecture("mask_rcnn", "mask_rcnn:mask_rcnn", predicts_instances=True, training_output="loss",
                 pretrained_encoder="mask_rcnn:imagenet_backbone_state",
                 input_mean=(127 / 255,) * 3, input_std=(128 / 255,) * 3,
                 encoder_params=r"detector\.backbone\.body\.",
                 head_params=r"detector\.(roi_heads\.(box|mask)_predictor|rpn\.head)\.",
                 paper="He et al., ICCV 2017"),
    Architecture("efficientnet_unet", "efficientnet_unet:efficientnet_unet",
                 pretrained_encoder="efficientnet_unet:imagenet_encoder_state",
                 # (x - 127) / 128 on 8-bit values, as the ImageNet weights were trained.
                 input_mean=(127 / 255,) * 3, input_std=(128 / 255,) * 3,
                 encoder_params=r"net\.encoder\.", head_params=r"net\.segmentation_head\.",
                 paper="Ronneberger et al. 2015 decoder on Tan & Le, ICML 2019 (EfficientNet-Lite0 or -Lite2) encoder"),
)

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in _TABLE}
# Derived views of the table, for callers that only need one fact.
INSTANCE_ARCHITECTURES: frozenset[str] = frozenset(a.name for a in _TABLE if a.predicts_instances)
INFERENCE_MODES: dict[str, tuple[str, ...]] = {a.name: a.inference_modes for a in _TABLE if a.inference_modes}


def get_architecture(name: str) -> Architecture:
    """The registry entry of an architecture; :class:`GlasSegError` for unknown names."""
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise GlasSegError(f"Unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None


def _resolve(reference: str) -> Callable:
    module, function = reference.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def build_architecture(name: str, **kwargs):
    """Build an untrained network by architecture name with builder keyword arguments.

    Raises
    ------
    GlasSegError
        Unknown architecture, or keyword arguments the builder does not take or refuses.
    """
    builder = _resolve(get_architecture(name).builder)
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as exc:
        raise GlasSegError(f"Bad arguments for architecture {name}: {exc}") from None


def pretrained_encoder_state(name: str, network) -> dict | None:
    """ImageNet weights for the encoder of ``network`` (built for architecture ``name``), keyed
    as in its state dict, or None when it has none."""
    reference = get_architecture(name).pretrained_encoder
    return _resolve(reference)(network) if reference else None
