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
import os
import re
from typing import Any

import timm.models.lowformer as timm_lowformer
import torch.nn as nn
from timm.models import build_model_with_cfg

from lowformer.models._api import FeatureTaps
from lowformer.models._dense import check_output_stride, default_out_indices, dilate_stages, select_taps
from lowformer.models._registry import ModelRecord, create_model, register_record, take_over_timm_models

__all__ = [
    "LowFormer", "LOWFORMER_MODELS", "to_original_state_dict",
    "get_lowformer_b0", "get_lowformer_b1", "get_lowformer_b15", "get_lowformer_b3",
    "get_lowformer_E1", "get_lowformer_E2", "get_lowformer_E3",
]

# The published variants; timm's lowformer_b2 is the original's unofficial, never-released config.
LOWFORMER_MODELS = [
    "lowformer_b0", "lowformer_b1", "lowformer_b15", "lowformer_b3", "lowformer_e1", "lowformer_e2", "lowformer_e3",
]


class LowFormer(FeatureTaps, timm_lowformer.LowFormer):
    """timm's LowFormer with what dense prediction needs: ``output_stride`` 8 or 16 (the last stages keep the
    resolution, their convs dilated; the attention's own pooled keys stay as they are) and, with
    ``stride2_feature``, the stride-2 stem output as feature 0, as the original backbone returns it (``stage0``).
    Parameters and state-dict keys are timm's."""

    norm_name = None  # the head's convs follow the last stage directly

    def __init__(self, *args: Any, output_stride: int = 32, stride2_feature: bool = False, **kwargs: Any) -> None:
        check_output_stride("LowFormer", output_stride, (8, 16, 32))
        super().__init__(*args, **kwargs)
        dilate_stages(self.stages, self.feature_info, output_stride, keep=(timm_lowformer.ConvAttention,))
        stem = dict(num_chs=[m for m in self.stem.modules() if isinstance(m, nn.Conv2d)][-1].out_channels,
                    reduction=2, module="stem")
        self.feature_info, self.first_tap = select_taps([stem] + self.feature_info, stride2_feature)

    def _remove_head(self) -> None:
        self.reset_classifier(0, reset_other=True)


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


# timm's configs of each published variant (timm's unofficial lowformer_b2 stays timm's), built as this module's
# LowFormer. Registering under timm's names replaces
# timm's entry points, so ``timm.create_model`` builds the same model as ``lowformer.create_model``.
_VARIANT_ARGS = {
    "lowformer_b0": dict(width_list=[16, 32, 64, 128, 256], depth_list=[0, 1, 1, 3, 4]),
    "lowformer_b1": dict(width_list=[16, 32, 64, 128, 256], depth_list=[0, 1, 1, 5, 5],
                         downsample_expand_ratios=(6, 6, 6, 6)),
    "lowformer_b15": dict(width_list=[20, 40, 80, 160, 320], depth_list=[0, 1, 1, 6, 6], head_widths=(2304, 2560),
                          downsample_expand_ratios=(6, 6, 6, 6)),
    "lowformer_b3": dict(width_list=[32, 64, 128, 256, 512], depth_list=[1, 2, 3, 6, 6], stem_expand_ratio=4,
                         downsample_expand_ratios=(6, 6, 6, 6)),
    "lowformer_e1": dict(width_list=[20, 40, 80, 160, 320], depth_list=[0, 1, 1, 4, 4], head_widths=(2304, 2560),
                         attn=False, attn_mlp=False, downsample_expand_ratios=(6, 6, 6, 6)),
    "lowformer_e2": dict(width_list=[32, 64, 128, 256, 512], depth_list=[1, 2, 3, 4, 4], attn=False, attn_mlp=False,
                         stem_expand_ratio=4, downsample_expand_ratios=(6, 6, 6, 6)),
    "lowformer_e3": dict(width_list=[32, 64, 128, 256, 512], depth_list=[1, 2, 3, 6, 6], attn_mlp=False,
                         stem_expand_ratio=4, downsample_expand_ratios=(6, 6, 6, 6)),
}
default_cfgs = timm_lowformer.default_cfgs
checkpoint_filter_fn = timm_lowformer.checkpoint_filter_fn


def _create_lowformer(variant: str, pretrained: bool = False, **kwargs: Any) -> LowFormer:
    return build_model_with_cfg(
        LowFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=default_out_indices(kwargs), feature_cls="getter"),
        **dict(_VARIANT_ARGS[variant], **kwargs),
    )


globals().update(take_over_timm_models(
    __name__, _VARIANT_ARGS, _create_lowformer, "timm's configuration, with ``output_stride`` and ``stride2_feature``.",
    original_layout=to_original_state_dict))
# timm's unofficial B2 is not listed, but its weights export to the original layout like the others'
register_record(ModelRecord("lowformer_b2", listed=False, original_layout=to_original_state_dict))


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
