"""Segmenters: segmentation_models_pytorch decoders on any project backbone (through timm's ``tu-`` encoders).

Presets follow the original setups' widths: Semantic FPN (FPN 256, 128-channel per-level heads summed at
stride 4, dropout 0.1), UperNet (512 channels, pool scales 1/2/3/6, auxiliary FCN head of 256 channels on
the stride-16 stage, loss weight 0.4), DeepLabv3 (ASPP 256 channels, rates 6/12/18, output stride 16 or 8),
SegFormer's all-MLP head (256 channels). Inputs of any size are padded right/bottom to a multiple of the
encoder's stride and the logits cropped back, so ``forward`` returns logits at the input resolution.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowformer.errors import LowformerError, import_optional

__all__ = ["ARCHS", "Segmenter", "SegmenterError", "create_segmenter", "load_encoder_checkpoint"]


class SegmenterError(LowformerError, ValueError):
    """A segmenter that cannot be built as asked."""


@dataclass(frozen=True)
class _Preset:
    smp_class: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    aux_channels: int = 0  # an auxiliary FCN head on the stride-16 features during training
    aux_weight: float = 0.0


ARCHS: dict[str, _Preset] = {
    "semantic_fpn": _Preset("FPN", {"decoder_pyramid_channels": 256, "decoder_segmentation_channels": 128,
                                        "decoder_merge_policy": "add", "decoder_dropout": 0.1,
                                        "decoder_interpolation": "bilinear"}),
    "upernet": _Preset("UPerNet", {"decoder_channels": 512}, aux_channels=256, aux_weight=0.4),
    "deeplabv3": _Preset("DeepLabV3", {"decoder_channels": 256, "decoder_atrous_rates": (6, 12, 18),
                                           "decoder_aspp_dropout": 0.1, "encoder_output_stride": 16}),
    "segformer": _Preset("Segformer", {"decoder_segmentation_channels": 256}),
}


class Segmenter(nn.Module):
    """An smp segmentation model plus, for UperNet, the auxiliary FCN head used in training.

    ``forward(x)`` returns logits ``(B, num_classes, H, W)``; in training mode with an auxiliary head it
    returns ``{"out": logits, "aux": aux_logits}`` (both at the input resolution)."""

    def __init__(self, net: nn.Module, arch: str, backbone: str, num_classes: int, aux_head: nn.Module | None,
                 aux_index: int, aux_weight: float) -> None:
        super().__init__()
        self.net, self.aux_head = net, aux_head
        self.arch, self.backbone, self.num_classes = arch, backbone, num_classes
        self.aux_index, self.aux_weight = aux_index, aux_weight
        # smp checks divisibility by the encoder's output stride; dilated encoders still downsample by 2**depth.
        self.size_divisor = 2 ** len(net.encoder.out_channels[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        d = self.size_divisor
        pad_h, pad_w = (-h) % d, (-w) % d
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        features = self.net.encoder(x)
        out = self.net.segmentation_head(self.net.decoder(features))
        out = self._to_input(out, x.shape[-2:], h, w)
        if self.training and self.aux_head is not None:
            aux = self._to_input(self.aux_head(features[self.aux_index]), x.shape[-2:], h, w)
            return {"out": out, "aux": aux}
        return out

    @staticmethod
    def _to_input(logits: torch.Tensor, padded: torch.Size, h: int, w: int) -> torch.Tensor:
        if logits.shape[-2:] != padded:
            logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


def _fcn_head(in_channels: int, channels: int, num_classes: int) -> nn.Sequential:
    """mmseg's auxiliary FCNHead (one 3x3 conv-BN-ReLU of ``channels``, dropout 0.1, 1x1 classifier);
    torchvision's ``FCNHead`` fixes the width at in_channels / 4, not the original 256."""
    from torchvision.ops import Conv2dNormActivation
    return nn.Sequential(Conv2dNormActivation(in_channels, channels, 3), nn.Dropout2d(0.1),
                         nn.Conv2d(channels, num_classes, 1))


def load_encoder_checkpoint(encoder: nn.Module, backbone: str, path: str | os.PathLike, **kwargs: Any) -> None:
    """Load a classification checkpoint of ``backbone`` (any layout ``lowformer.load_checkpoint`` reads,
    of any class count) into an smp ``tu-`` encoder, through the shared dense-backbone adapter: the same
    timm feature extractor is built from the loaded classifier and copied over strictly."""
    from lowformer.dense import create_backbone
    # smp always returns the deepest map, so the feature extractor ends at the same module.
    dense = create_backbone(backbone, strides=(max(encoder.model.feature_info.reduction()),),
                            checkpoint_path=path, **kwargs)
    own = encoder.model.state_dict()
    loaded = dense.body.state_dict()
    missing = [k for k in own if k not in loaded or loaded[k].shape != own[k].shape]
    if missing:
        raise SegmenterError(f"checkpoint '{path}': the {backbone} encoder's {missing[0]} has no counterpart in "
                             f"the feature extractor built from it ({len(missing)} tensors)")
    encoder.model.load_state_dict({k: loaded[k] for k in own})


def create_segmenter(arch: str, backbone: str, num_classes: int, *, checkpoint_path: str | os.PathLike | None = None,
                     output_stride: int | None = None, **kwargs: Any) -> Segmenter:
    """Build ``arch`` (``semantic_fpn``, ``upernet``, ``deeplabv3``, ``segformer``) on the project or timm
    model ``backbone`` with ``num_classes`` outputs; nothing is downloaded.

    Args:
        checkpoint_path: the backbone's classification checkpoint (original layouts included), loaded
            into the encoder; the decoder starts from random weights.
        output_stride: DeepLabv3's encoder output stride, 16 (default) or 8.
        kwargs: overrides of the preset's smp arguments, or encoder arguments (e.g. ``drop_path_rate``).
    """
    smp = import_optional("segmentation_models_pytorch", "segmentation", "segmentation")

    import lowformer.models  # noqa: F401  (registers the project's families with timm)
    if arch not in ARCHS:
        raise SegmenterError(f"segmenter '{arch}': unknown, use one of {', '.join(ARCHS)}")
    if num_classes < 1:
        raise SegmenterError(f"num_classes must be at least 1, got {num_classes}")
    preset = ARCHS[arch]
    smp_kwargs = dict(preset.kwargs)
    if output_stride is not None:
        if arch != "deeplabv3" or output_stride not in (8, 16):
            raise SegmenterError(f"output_stride {output_stride}: only deeplabv3 takes one, 8 or 16")
        smp_kwargs["encoder_output_stride"] = output_stride
    smp_kwargs.update(kwargs)
    import timm
    if not timm.is_model(backbone):
        raise SegmenterError(f"backbone '{backbone}': unknown model (see `lowformer models`)")
    try:
        net = getattr(smp, preset.smp_class)(encoder_name=f"tu-{backbone}", encoder_weights=None,
                                             classes=num_classes, **smp_kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SegmenterError(f"{arch} on {backbone}: cannot be built ({str(e).splitlines()[0][:200]})") from None
    if checkpoint_path is not None:
        encoder_kwargs = {k: v for k, v in kwargs.items() if k not in ARCHS[arch].kwargs}
        if output_stride is not None:
            encoder_kwargs["output_stride"] = output_stride
        load_encoder_checkpoint(net.encoder, backbone, checkpoint_path, **encoder_kwargs)
    aux_head, aux_index = None, -1
    if preset.aux_channels:
        aux_index = len(net.encoder.out_channels) - 2  # stride 16: the last but one stage
        aux_head = _fcn_head(net.encoder.out_channels[aux_index], preset.aux_channels, num_classes)
    return Segmenter(net, arch, backbone, num_classes, aux_head, aux_index, preset.aux_weight)
