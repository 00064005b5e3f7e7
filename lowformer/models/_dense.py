"""What dense prediction needs from a backbone, written once: ``output_stride`` (dilated last stages, timm's
convention) and the optional stride-2 feature tap.

Feature taps follow timm's convention for four-stage backbones: ``feature_info`` indices 0-3 are the maps at
strides 4, 8, 16 and 32 (what detectors' FPNs and segmentation_models_pytorch's ``tu-`` encoders address by
index). A family with a stride-2 map lists it in front, as index 0, when built with ``stride2_feature=True``
(its stride 4-32 maps are then 1-4 and the default ``out_indices`` still picks them).
"""
from typing import Any, Dict, List, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

from lowformer.errors import LowformerError

__all__ = ["OutputStrideError", "check_output_stride", "default_out_indices", "dilate_stages", "pad_to_multiple",
           "select_taps"]


class OutputStrideError(LowformerError, ValueError):
    """An ``output_stride`` the family cannot provide."""


def check_output_stride(family: str, output_stride: int, supported: Sequence[int] = (32,)) -> None:
    """Refuse an ``output_stride`` the family cannot give, in one line naming the family."""
    if output_stride not in supported:
        what = "only 32 (it has no dilated form)" if tuple(supported) == (32,) else \
            "one of " + ", ".join(str(s) for s in supported)
        raise OutputStrideError(f"{family} cannot run at output_stride={output_stride}: it supports {what}")


def _dilate_conv(conv: nn.Conv2d, dilation: int) -> None:
    k = conv.kernel_size[0]
    conv.stride = (1, 1)
    if k > 1 and not isinstance(conv.padding, str):
        conv.dilation = (dilation, dilation)
        conv.padding = (dilation * (k - 1) // 2, dilation * (conv.kernel_size[1] - 1) // 2)


def dilate_stages(
        stages: Sequence[nn.Module],
        feature_info: List[Dict[str, Any]],
        output_stride: int,
        keep: Tuple[Type[nn.Module], ...] = (),
) -> None:
    """Make the stages whose stride exceeds ``output_stride`` keep the resolution, in place: their stride-2
    convs become stride 1 with the dilation reached so far, the convs after them use the new dilation
    (timm's ``first_dilation`` / ``dilation`` rule). Submodules of the types in ``keep`` (attention that pools
    its own keys and upsamples back) stay as they are. ``feature_info`` holds one entry per stage."""
    prev_reduction = 1
    for stage, info in zip(stages, feature_info):
        reduction = info["reduction"]
        if reduction > output_stride:
            dilation_in = max(prev_reduction // output_stride, 1)
            dilation = reduction // output_stride
            kept = {id(m) for k in stage.modules() if isinstance(k, keep) for m in k.modules()}
            strided = False
            for m in stage.modules():
                if not isinstance(m, nn.Conv2d) or id(m) in kept:
                    continue
                if not strided and m.stride[0] > 1:
                    _dilate_conv(m, dilation_in)
                    strided = True
                else:
                    _dilate_conv(m, dilation_in if not strided else dilation)
            info["reduction"] = output_stride
        prev_reduction = reduction


def select_taps(taps: List[Dict[str, Any]], stride2_feature: bool) -> Tuple[List[Dict[str, Any]], int]:
    """``feature_info`` from every tap a family has (stride-2 first where present) and how many leading taps
    were left out: the stride-2 tap goes unless ``stride2_feature``."""
    offset = 1 if taps[0]["reduction"] == 2 and not stride2_feature else 0
    return taps[offset:], offset


@register_notrace_function  # pads by amounts read from the input shape
def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad an NCHW map right and bottom to a multiple of ``multiple`` (Swin's detection backbones'
    window grid)."""
    H, W = x.shape[-2], x.shape[-1]
    return F.pad(x, (0, (multiple - W % multiple) % multiple, 0, (multiple - H % multiple) % multiple))


def default_out_indices(kwargs: Dict[str, Any], num_maps: int = 4) -> Tuple[int, ...]:
    """``features_only``'s default taps: the maps at strides 4-32 (8-32 where there is no stride-4 map),
    wherever ``stride2_feature`` puts them."""
    start = 1 if kwargs.get("stride2_feature") else 0
    return tuple(range(start, start + num_maps))
