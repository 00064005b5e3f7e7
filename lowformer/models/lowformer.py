"""LowFormer (B0, B1, B1.5, B3, E1, E2, E3): timm's implementation, plus what its users lack.

timm 1.0.31 ships the family exactly (its ``checkpoint_filter_fn`` maps the original keys, including the
old ``head.opseq.*`` layout), so nothing here re-implements a layer. This module adds:

* the original standalone entry points (``get_lowformer_b0`` ... ``get_lowformer_E3``) with
  ``pretrained=`` taking a local checkpoint path;
* feature extraction at every stride the network has: timm's ``features_only`` starts at stride 4,
  the original backbone also returns the stride-2 stem output (``stage0``);
* the inverse of timm's key remap (:func:`to_original_state_dict`), so trained weights can be published in
  the original layout and the original's name-based rules (weight-decay exemption) see the original names.

Paper: "LowFormer: Hardware Efficient Design for Convolutional Transformer Backbones",
https://arxiv.org/abs/2409.03460, code https://github.com/altair199797/LowFormer.
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch.nn as nn
from timm.models import FeatureListNet

from lowformer.checkpoints import register_original_layout
from lowformer.models._registry import create_model, register_feature_cls, register_project_models

__all__ = [
    "LowFormerFeatures", "LOWFORMER_MODELS", "to_original_state_dict",
    "get_lowformer_b0", "get_lowformer_b1", "get_lowformer_b15", "get_lowformer_b3",
    "get_lowformer_E1", "get_lowformer_E2", "get_lowformer_E3",
]

# The published variants; timm's lowformer_b2 is the original's unofficial, never-released config.
LOWFORMER_MODELS = [
    "lowformer_b0", "lowformer_b1", "lowformer_b15", "lowformer_b3", "lowformer_e1", "lowformer_e2", "lowformer_e3",
]


class LowFormerFeatures(FeatureListNet):
    """timm's feature list with the stride-2 stem output in front, as the original backbone returns it
    (``stage0``, ``stage1``, ``stage2``, ``stage3``, ``stage_final`` at strides 2 to 32)."""

    def __init__(self, model: nn.Module, out_indices: tuple[int, ...] = (0, 1, 2, 3, 4), **kwargs: Any) -> None:
        if model.feature_info[0]["reduction"] != 2:
            stem = dict(num_chs=_stem_width(model),
                        reduction=2, module=f"stem.{len(model.stem) - 1}")
            model.feature_info = [stem] + list(model.feature_info)
        super().__init__(model, out_indices=out_indices, **kwargs)


def _stem_width(model: nn.Module) -> int:
    return [m for m in model.stem.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


# Native -> original key fragments, the inverse of timm's checkpoint_filter_fn (applied in this order).
_TO_ORIGINAL = [
    (re.compile(r"^stem\.(\d+)\."), r"backbone.input_stem.op_list.\1."),
    (re.compile(r"^stages\.(\d+)\.(\d+)\."), r"backbone.stages.\1.op_list.\2."),
    (re.compile(r"^in_conv\."), "head.op_list.0."),
    (re.compile(r"^pre_classifier\.0\."), "head.op_list.2.linear."),
    (re.compile(r"^pre_classifier\.1\."), "head.op_list.2.norm."),
    (re.compile(r"^classifier\."), "head.op_list.3.linear."),
    (re.compile(r"\.mlp\."), ".total.0.1."),
    (re.compile(r"\.local\."), ".total.1."),
    (re.compile(r"\.conv_proj\.conv\."), ".conv_proj.0."),
    (re.compile(r"\.conv_proj\.norm\."), ".conv_proj.1."),
    (re.compile(r"\.pwise\.weight$"), ".pwise.0.weight"),
]


def to_original_state_dict(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The same tensors under the original implementation's keys (``evalmodel.pt`` layout).

    A block's attention is ``total.0.0`` when the block also has an MLP (B series), else ``total.0``."""
    with_mlp = {k.split(".mlp.")[0] for k in state_dict if ".mlp." in k}
    out = {}
    for key, value in state_dict.items():
        block = key.split(".attn.")[0] if ".attn." in key else None
        new = key.replace(".attn.", ".total.0.0." if block in with_mlp else ".total.0.")
        for pattern, repl in _TO_ORIGINAL:
            new = pattern.sub(repl, new)
        out[new] = value
    return out


register_project_models(LOWFORMER_MODELS)
register_feature_cls(LOWFORMER_MODELS + ["lowformer_b2"], LowFormerFeatures, (0, 1, 2, 3, 4))
register_original_layout(LOWFORMER_MODELS + ["lowformer_b2"], to_original_state_dict)


def _get(name: str, pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> nn.Module:
    if isinstance(pretrained, (str, os.PathLike)):
        return create_model(name, checkpoint_path=pretrained, **kwargs)
    return create_model(name, pretrained=bool(pretrained), **kwargs)


def get_lowformer_b0(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> nn.Module:
    """LowFormer-B0; ``pretrained`` is a checkpoint path (``evalmodel.pt`` as released) or True for the
    weights folder."""
    return _get("lowformer_b0", pretrained, **kwargs)


def get_lowformer_b1(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> nn.Module:
    """LowFormer-B1; ``pretrained`` as in :func:`get_lowformer_b0`."""
    return _get("lowformer_b1", pretrained, **kwargs)


def get_lowformer_b15(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> nn.Module:
    """LowFormer-B1.5; ``pretrained`` as in :func:`get_lowformer_b0`."""
    return _get("lowformer_b15", pretrained, **kwargs)


def get_lowformer_b3(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> nn.Module:
    """LowFormer-B3; ``pretrained`` as in :func:`get_lowformer_b0`."""
    return _get("lowformer_b3", pretrained, **kwargs)


def get_lowformer_E1(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> nn.Module:
    """LowFormer-E1 (Edge GPU); ``pretrained`` as in :func:`get_lowformer_b0`."""
    return _get("lowformer_e1", pretrained, **kwargs)


def get_lowformer_E2(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> nn.Module:
    """LowFormer-E2 (Edge GPU); ``pretrained`` as in :func:`get_lowformer_b0`."""
    return _get("lowformer_e2", pretrained, **kwargs)


def get_lowformer_E3(pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> nn.Module:
    """LowFormer-E3 (Edge GPU); ``pretrained`` as in :func:`get_lowformer_b0`."""
    return _get("lowformer_e3", pretrained, **kwargs)
