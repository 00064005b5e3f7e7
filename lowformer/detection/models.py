"""Detectors from torchvision on any project backbone, and the original setups as named presets.

Every detector is torchvision's (RetinaNet, FCOS, Faster R-CNN, Mask R-CNN, SSD with SSDLite heads);
this module only joins a :class:`lowformer.dense.DenseBackbone` to torchvision's FeaturePyramidNetwork
(or to SSD extra layers) and sets the heads. :class:`Detector` keeps labels contiguous (0..K-1 for the
K object classes) whatever background convention the torchvision model uses.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import (
    AnchorGenerator,
    DefaultBoxGenerator,
)
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from lowformer.dense import DenseBackbone
from lowformer.errors import LowformerError

__all__ = ["ARCHS", "PRESETS", "Detector", "DetectorConfig", "DetectorExport", "DetectorError", "create_detector", "list_presets"]

ARCHS = ("retinanet", "fcos", "faster_rcnn", "mask_rcnn", "ssdlite")


class DetectorError(LowformerError, ValueError):
    """An unknown detector, preset or setting."""


@dataclass
class DetectorConfig:
    """Settings of one detector; a preset fixes them to an original setup, keywords override them.

    Sizes follow torchvision: evaluation resizes the shorter side to ``min_size`` (longer at most
    ``max_size``); SSD uses ``size`` x ``size``. Training images come resized by the data pipeline.
    """
    strides: tuple[int, ...] = (8, 16, 32)
    fpn_channels: int = 256
    extra_levels: int = 2  # P6/P7 above the backbone (RetinaNet, FCOS); R-CNNs add one max-pooled P6
    anchor_scale: float = 4.0  # anchor side = anchor_scale x stride (RetinaNet: 4, RPN: 8)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    octaves: int = 3
    head_convs: int = 4
    head_norm: str = "none"  # "none", "group" (GroupNorm 32) or "batch"
    min_size: int = 800
    max_size: int = 1333
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 1000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    box_head: str = "2fc"  # "2fc" (two shared FC 1024) or "4conv1fc" (4 convs 256 + BN + FC 1024)
    ssd_extra_channels: tuple[int, ...] = (256, 128, 128)
    ssd_global_channels: int = 64
    ssd_proj_channels: tuple[int, ...] = (512, 256)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)


def _norm(kind: str, channels_hint: int = 32) -> Any:
    if kind == "group":
        return partial(nn.GroupNorm, 32)
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "none":
        return None
    raise DetectorError(f"head_norm '{kind}' is not one of none, group, batch")


# The original setups (../shared/spec/downstream.md); LowFormer's paper used RetinaNet with the
# framework's standard settings, which are these.
PRESETS: dict[str, tuple[str, str, DetectorConfig]] = {
    "retinanet_lowformer_b1": ("retinanet", "lowformer_b1", DetectorConfig()),
    "retinanet_lowformer_b0": ("retinanet", "lowformer_b0", DetectorConfig()),
    "fcos_lowformer_b1": ("fcos", "lowformer_b1", DetectorConfig(head_norm="group")),
    "mask_rcnn_visformer_small_v2": ("mask_rcnn", "visformer_small_v2", DetectorConfig(
        strides=(4, 8, 16, 32), extra_levels=1, anchor_scale=8.0, octaves=1,
        backbone_kwargs={"drop_path_rate": 0.2, "window_size": (14, 7)})),
    # Visformer V1 has no stride-4 stage (its stem jumps from stride 2 to the stride-8 stage 1).
    "mask_rcnn_visformer_small": ("mask_rcnn", "visformer_small", DetectorConfig(
        strides=(8, 16, 32), extra_levels=1, anchor_scale=8.0, octaves=1,
        backbone_kwargs={"drop_path_rate": 0.1, "window_size": (14, 7)})),
    # Nearest torchvision setup to DWNet's Cascade Mask R-CNN: its 4conv1fc BN box head, one stage.
    "mask_rcnn_dwnet_tiny": ("mask_rcnn", "dwnet_tiny", DetectorConfig(
        strides=(4, 8, 16, 32), extra_levels=1, anchor_scale=8.0, octaves=1, box_head="4conv1fc",
        backbone_kwargs={"drop_path_rate": 0.2, "window_pad": True})),
    "faster_rcnn_visformer_small_v2": ("faster_rcnn", "visformer_small_v2", DetectorConfig(
        strides=(4, 8, 16, 32), extra_levels=1, anchor_scale=8.0, octaves=1,
        backbone_kwargs={"window_size": (14, 7)})),
    "ssdlite_edgeformer_s": ("ssdlite", "edgeformer_s", DetectorConfig(
        strides=(16, 32), min_size=320, max_size=320, score_thresh=0.05, nms_thresh=0.5,
        detections_per_img=200)),
}


def list_presets() -> list[str]:
    """Names of the detector presets (``<arch>_<backbone>``)."""
    return sorted(PRESETS)


class BackboneWithFPN(nn.Module):
    """A dense backbone followed by torchvision's FPN; ``out_channels`` as torchvision detectors expect."""

    def __init__(self, body: DenseBackbone, channels: int, extra_blocks: nn.Module | None,
                 norm_layer: Any = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, channels, extra_blocks=extra_blocks, norm_layer=norm_layer)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SSDBackbone(nn.Module):
    """EdgeFormer's SSD feature levels: the backbone's stride-16/32 maps projected by 1x1 conv-BN-ReLU,
    extra stride-2 separable blocks (3x3 depth-wise + BN, 1x1 + BN + ReLU) and a global pooled level."""

    def __init__(self, body: DenseBackbone, proj: tuple[int, ...], extra: tuple[int, ...], global_ch: int) -> None:
        super().__init__()
        self.body = body
        self.proj = nn.ModuleList(_conv_bn_relu(c, p, 1) for c, p in zip(body.out_channels, proj))
        cin, blocks = body.out_channels[-1], []
        for c in extra:
            blocks.append(nn.Sequential(_conv_bn_relu(cin, cin, 3, 2, groups=cin, act=False), _conv_bn_relu(cin, c, 1)))
            cin = c
        self.extra = nn.ModuleList(blocks)
        self.glob = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, global_ch, 1), nn.ReLU(inplace=True))
        self.out_channels = [*proj[:len(body.out_channels)], *extra, global_ch]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = list(self.body(x).values())
        out = [p(f) for p, f in zip(self.proj, feats)]
        y = feats[-1]
        for block in self.extra:
            y = block(y)
            out.append(y)
        out.append(self.glob(y))
        return OrderedDict((str(i), f) for i, f in enumerate(out))


class Detector(nn.Module):
    """A torchvision detector with contiguous labels 0..num_classes-1 in targets and outputs.

    ``forward(images, targets)`` returns torchvision's loss dict in training and its detections
    (boxes in input-image coordinates, ``labels``, ``scores``, ``masks`` for Mask R-CNN) in eval.
    """

    def __init__(self, model: nn.Module, arch: str, backbone: str, num_classes: int, cfg: DetectorConfig) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.backbone_name = backbone
        self.num_classes = num_classes
        # Stored with the weights, so a run's evalmodel.pt says which head to rebuild.
        self.register_buffer("class_count", torch.tensor(num_classes), persistent=True)
        self.cfg = cfg
        # Softmax heads (R-CNN boxes, SSD) reserve index 0 for background; sigmoid heads do not.
        self.label_offset = 0 if arch in ("retinanet", "fcos") else 1

    @property
    def has_masks(self) -> bool:
        return self.arch == "mask_rcnn"

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        if targets is not None:
            targets = [{**t, "labels": t["labels"] + self.label_offset} for t in targets]
        out = self.model(images, targets)
        if isinstance(out, list):
            out = [{**o, "labels": o["labels"] - self.label_offset} for o in out]
        return out

    @property
    def output_names(self) -> tuple[str, ...]:
        """The per-image detections, in the order :class:`DetectorExport` returns them."""
        return ("boxes", "scores", "labels", "masks") if self.has_masks else ("boxes", "scores", "labels")

    @property
    def test_size(self) -> tuple[int, int]:
        """(height, width) of a landscape image at the evaluation resize: shorter side ``min_size``, longer
        ``max_size`` (mmdet's 1333x800); SSD's fixed square."""
        t = self.model.transform
        if t.fixed_size is not None:
            return int(t.fixed_size[0]), int(t.fixed_size[1])
        return int(t.min_size[-1]), int(t.max_size)

    def set_test_size(self, height: int, width: int) -> None:
        """Evaluate ``height`` x ``width`` inputs at that size (no resize) instead of the preset's."""
        t = self.model.transform
        if t.fixed_size is not None:
            t.fixed_size = (height, width)
        else:
            t.min_size, t.max_size = (min(height, width),), max(height, width)

    def cost_forward(self, x: torch.Tensor, proposals: int = 1000, mask_rois: int = 100) -> list[torch.Tensor]:
        """What a detector's size is counted on, as mmdetection's ``forward_dummy`` defines it: backbone,
        neck and dense heads on the (already normalised) batch ``x``; for the R-CNNs the box head on
        ``proposals`` fixed RoIs and the mask head on the first ``mask_rois`` of them, instead of the
        data-dependent RPN proposals, NMS and score filtering of a real forward."""
        m = self.model
        feats = m.backbone(x)
        if self.arch in ("retinanet", "fcos", "ssdlite"):
            out = m.head(list(feats.values()))
            return list(out.values())
        objectness, deltas = m.rpn.head(list(feats.values()))
        h, w = x.shape[-2:]
        # fixed boxes spread over the image: RoIAlign's cost does not depend on where they are
        t = torch.linspace(0, 1, proposals, device=x.device)
        boxes = torch.stack([t * w * 0.5, t.flip(0) * h * 0.5, t * w * 0.5 + w * 0.5, t.flip(0) * h * 0.5 + h * 0.5], 1)
        shapes = [(h, w)] * x.shape[0]
        rh = m.roi_heads
        box_feats = rh.box_head(rh.box_roi_pool(feats, [boxes] * x.shape[0], shapes))
        out = [*objectness, *deltas, *rh.box_predictor(box_feats)]
        if self.has_masks:
            out.append(rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(feats, [boxes[:mask_rois]] * x.shape[0],
                                                                       shapes))))
        return out


class DetectorExport(nn.Module):
    """A detector as an exportable graph: one ``(1, 3, H, W)`` image (pixels in 0..1) in, its detections
    ``boxes`` (N, 4), ``scores`` (N,), ``labels`` (N,) (and ``masks`` (N, 1, H, W) for Mask R-CNN) out, N
    varying with the image; resize, normalisation, NMS and score filtering are in the graph."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector
        self.output_names = detector.output_names
        self.dynamic_axes = {name: {0: "detections"} for name in self.output_names}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        det = self.detector([x[0]])[0]
        return tuple(det[name] for name in self.output_names)


def _anchor_sizes(cfg: DetectorConfig, strides: list[int]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(cfg.anchor_scale * s * 2 ** (i / cfg.octaves) for i in range(cfg.octaves)) for s in strides)


def create_detector(
        arch: str,
        backbone: str,
        num_classes: int,
        *,
        preset: str | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        pretrained: bool = False,
        frozen_stages: int = -1,
        freeze_bn: bool = False,
        **settings: Any,
) -> Detector:
    """Build torchvision's ``arch`` detector on a project ``backbone``.

    Args:
        arch: one of ``retinanet``, ``fcos``, ``faster_rcnn``, ``mask_rcnn``, ``ssdlite``.
        backbone: any ``lowformer.create_model`` name.
        num_classes: object classes only (a background class is added where the head needs one).
        preset: a name from :func:`list_presets` whose settings are the defaults (default: the preset
            ``<arch>_<backbone>`` when it exists, else torchvision's standard settings for ``arch``).
        checkpoint_path / pretrained: classification weights for the backbone (any layout
            ``lowformer.load_checkpoint`` reads); never downloads.
        frozen_stages / freeze_bn: see :class:`lowformer.dense.DenseBackbone`.
        **settings: :class:`DetectorConfig` fields overriding the preset (``backbone_kwargs`` update the
            preset's backbone arguments key by key).
    """
    if arch not in ARCHS:
        raise DetectorError(f"unknown detector '{arch}': choose one of {', '.join(ARCHS)}")
    if num_classes < 1:
        raise DetectorError(f"num_classes must count the object classes (>= 1), got {num_classes}")
    name = preset or f"{arch}_{backbone}"
    if preset is not None and preset not in PRESETS:
        raise DetectorError(f"unknown preset '{preset}': choose one of {', '.join(list_presets())}")
    if name in PRESETS:
        cfg = PRESETS[name][2]
    else:
        cfg = _default_config(arch)
    unknown = sorted(set(settings) - set(DetectorConfig.__dataclass_fields__))
    if unknown:
        raise DetectorError(f"unknown detector setting(s) {unknown}: valid ones are the DetectorConfig fields")
    if "backbone_kwargs" in settings:  # added to the preset's (Visformer's windows stay when drop path is set)
        settings["backbone_kwargs"] = {**cfg.backbone_kwargs, **settings["backbone_kwargs"]}
    cfg = replace(cfg, **settings)
    if cfg.head_norm == "group" and cfg.fpn_channels % 32:
        raise DetectorError(f"fpn_channels {cfg.fpn_channels}: GroupNorm heads take 32 groups, so use a multiple of 32")
    body = DenseBackbone(backbone, strides=cfg.strides, checkpoint_path=checkpoint_path, pretrained=pretrained,
                         frozen_stages=frozen_stages, freeze_bn=freeze_bn, **cfg.backbone_kwargs)
    pcfg = getattr(body.body, "pretrained_cfg", {}) or {}
    common = {"image_mean": list(pcfg.get("mean", (0.485, 0.456, 0.406))),
                  "image_std": list(pcfg.get("std", (0.229, 0.224, 0.225))), "_skip_resize": True}
    model = _build(arch, body, num_classes, cfg, common)
    return Detector(model, arch, backbone, num_classes, cfg)


def _default_config(arch: str) -> DetectorConfig:
    if arch in ("faster_rcnn", "mask_rcnn"):
        return DetectorConfig(strides=(4, 8, 16, 32), extra_levels=1, anchor_scale=8.0, octaves=1)
    if arch == "fcos":
        return DetectorConfig(head_norm="group")
    if arch == "ssdlite":
        return DetectorConfig(strides=(16, 32), min_size=320, max_size=320, detections_per_img=200)
    return DetectorConfig()


def _build(arch: str, body: DenseBackbone, num_classes: int, cfg: DetectorConfig, common: dict) -> nn.Module:
    if arch == "ssdlite":
        return _build_ssdlite(body, num_classes, cfg, common)
    c5, ch = body.out_channels[-1], cfg.fpn_channels
    if arch in ("retinanet", "fcos"):
        extra = LastLevelP6P7(c5, ch) if cfg.extra_levels == 2 else None
        if cfg.extra_levels not in (0, 2):
            raise DetectorError(f"extra_levels for {arch} is 0 or 2 (P6 and P7), got {cfg.extra_levels}")
    else:
        extra = LastLevelMaxPool() if cfg.extra_levels else None
    neck = BackboneWithFPN(body, ch, extra)
    strides = list(body.strides) + [body.strides[-1] * 2 ** (i + 1) for i in range(cfg.extra_levels)]
    levels = len(strides)
    size = {"min_size": cfg.min_size, "max_size": cfg.max_size}
    if arch == "retinanet":
        anchors = AnchorGenerator(_anchor_sizes(cfg, strides), (cfg.aspect_ratios,) * levels)
        head = RetinaNetHead(ch, anchors.num_anchors_per_location()[0], num_classes, norm_layer=_norm(cfg.head_norm))
        _trim_head_convs(head, cfg.head_convs)
        return RetinaNet(neck, num_classes, **size, **common, anchor_generator=anchors, head=head,
                         score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                         detections_per_img=cfg.detections_per_img)
    if arch == "fcos":
        anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * levels)
        model = FCOS(neck, num_classes, **size, **common, anchor_generator=anchors, score_thresh=cfg.score_thresh,
                     nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img)
        if cfg.head_norm != "group":
            raise DetectorError("FCOS uses torchvision's GroupNorm head: head_norm must be 'group'")
        _trim_head_convs(model.head, cfg.head_convs)
        return model
    anchors = AnchorGenerator(tuple((cfg.anchor_scale * s,) for s in strides), (cfg.aspect_ratios,) * levels)
    kwargs: dict[str, Any] = {
        "rpn_anchor_generator": anchors, "rpn_pre_nms_top_n_train": cfg.rpn_pre_nms_train,
        "rpn_post_nms_top_n_train": cfg.rpn_post_nms_train, "rpn_pre_nms_top_n_test": cfg.rpn_pre_nms_test,
        "rpn_post_nms_top_n_test": cfg.rpn_post_nms_test, "box_score_thresh": cfg.score_thresh,
        "box_nms_thresh": cfg.nms_thresh, "box_detections_per_img": cfg.detections_per_img}
    if cfg.box_head == "4conv1fc":
        kwargs["box_head"] = FastRCNNConvFCHead((ch, 7, 7), [ch] * 4, [1024], norm_layer=nn.BatchNorm2d)
    elif cfg.box_head != "2fc":
        raise DetectorError(f"box_head '{cfg.box_head}' is not one of 2fc, 4conv1fc")
    cls = MaskRCNN if arch == "mask_rcnn" else FasterRCNN
    return cls(neck, num_classes + 1, **size, **common, **kwargs)


def _trim_head_convs(head: nn.Module, n: int) -> None:
    """Keep the first ``n`` of the 4 shared convs in both branches (cheaper heads for small inputs)."""
    if not 1 <= n <= 4:
        raise DetectorError(f"head_convs must be 1..4, got {n}")
    for branch in (head.classification_head, head.regression_head):
        branch.conv = branch.conv[:n]


def _build_ssdlite(body: DenseBackbone, num_classes: int, cfg: DetectorConfig, common: dict) -> nn.Module:
    feats = SSDBackbone(body, cfg.ssd_proj_channels, cfg.ssd_extra_channels, cfg.ssd_global_channels)
    levels = len(feats.out_channels)
    ratios = [[2, 3]] * (levels - 1) + [[2]]
    scales = [0.1 + (1.05 - 0.1) * i / levels for i in range(levels + 1)]
    anchors = DefaultBoxGenerator(ratios, scales=scales)
    head = SSDLiteHead(feats.out_channels, anchors.num_anchors_per_location(), num_classes + 1,
                       partial(nn.BatchNorm2d, eps=0.001, momentum=0.03))
    size = (cfg.min_size, cfg.min_size)
    return SSD(feats, anchors, size, num_classes + 1, head=head, score_thresh=cfg.score_thresh,
               nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img, **common)
