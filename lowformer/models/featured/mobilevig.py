"""MobileViG

Paper: "MobileViG: Graph-Based Sparse Attention for Mobile Vision Applications", Mustafa Munir, William Avery,
Radu Marculescu, CVPR Workshops 2023 - https://arxiv.org/abs/2307.00395
Original code: https://github.com/SLDGroup/MobileViG (vendored by LowFormer as ``other_models/mobilevig.py``,
whose checkpoint layout ``checkpoint_filter_fn`` reads; checkpoints trained with a distillation head load too).

@inproceedings{munir2023mobilevig,
  title={MobileViG: Graph-Based Sparse Attention for Mobile Vision Applications},
  author={Munir, Mustafa and Avery, William and Marculescu, Radu},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition Workshops},
  pages={2211--2219},
  year={2023}
}

Re-implemented for lowformer in timm's layout: three stages of inverted-residual blocks, then one stage of
sparse vision graph attention (SVGA) blocks at stride 32. Only conv + BN folding applies at deploy time.
"""

from typing import Any, Sequence

import torch
import torch.nn as nn
from timm.layers import (
    BatchNormAct2d,
    ConvNormAct,
    DropPath,
    LayerScale2d,
    calculate_drop_path_rates,
    trunc_normal_,
)
from timm.layers._fx import register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from lowformer.models._api import StagedModel
from lowformer.models._dense import check_output_stride
from lowformer.models._registry import record
from lowformer.models.featured._base import Stage, featured_cfg, rename_prefix

__all__ = ["MobileViG"]


class InvertedResidual(nn.Module):
    """1x1 expand (x4) + BN + GELU, 3x3 depthwise + BN + GELU, 1x1 project + BN, layer scale, residual."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, layer_scale_init_value: float = 1e-5,
                 drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.conv_pw = ConvNormAct(dim, hidden, 1, bias=True, act_layer=act_layer)
        self.conv_dw = ConvNormAct(hidden, hidden, 3, groups=hidden, bias=True, act_layer=act_layer)
        self.conv_pwl = ConvNormAct(hidden, dim, 1, bias=True, apply_act=False)
        self.ls = LayerScale2d(dim, layer_scale_init_value)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ls(self.conv_pwl(self.conv_dw(self.conv_pw(x)))))


@register_notrace_module  # loops over the map size
class MaxRelative(nn.Module):
    """Sparse vision graph attention's aggregation: for every hop distance K, 2K, ... below the map size, the
    map minus a copy of itself rolled by that distance along H and along W; the element-wise maximum of all
    of these and of zero (the original's accumulator starts from zeros)."""

    def __init__(self, hop: int = 2) -> None:
        super().__init__()
        self.hop = hop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        out = torch.zeros_like(x)
        for shift in range(self.hop, height, self.hop):
            out = torch.maximum(out, x - torch.roll(x, shift, dims=2))
        for shift in range(self.hop, width, self.hop):
            out = torch.maximum(out, x - torch.roll(x, shift, dims=3))
        return out


class Grapher(nn.Module):
    """1x1 conv + BN, then [x, max-relative(x)] (2C) -> 1x1 conv + BN + GELU (2C) -> 1x1 conv + BN (C)."""

    def __init__(self, dim: int, hop: int = 2, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = ConvNormAct(dim, dim, 1, bias=True, apply_act=False)
        self.max_relative = MaxRelative(hop)
        self.graph_proj = ConvNormAct(2 * dim, 2 * dim, 1, bias=True, act_layer=act_layer)
        self.fc2 = ConvNormAct(2 * dim, dim, 1, bias=True, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.graph_proj(torch.cat([x, self.max_relative(x)], dim=1))
        return self.fc2(x)


class Ffn(nn.Module):
    """1x1 conv + BN + GELU (4C), 1x1 conv + BN (C)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = ConvNormAct(dim, int(dim * mlp_ratio), 1, bias=True, act_layer=act_layer)
        self.fc2 = ConvNormAct(int(dim * mlp_ratio), dim, 1, bias=True, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class GraphBlock(nn.Module):
    """Residual Grapher then residual FFN (one stochastic-depth rate for both)."""

    def __init__(self, dim: int, hop: int = 2, drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.grapher = Grapher(dim, hop, act_layer)
        self.ffn = Ffn(dim, 4.0, act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.grapher(x))
        return x + self.drop_path(self.ffn(x))


def _downsample(in_chs: int, dim: int) -> nn.Module:
    """A stage's entry: 3x3 stride-2 conv + BN."""
    return ConvNormAct(in_chs, dim, 3, 2, bias=True, apply_act=False)


class MobileViG(StagedModel):
    """MobileViG: conv stem (stride 4), three inverted-residual stages, one SVGA stage at stride 32, and a
    head of pool -> 1x1 conv + BN + GELU -> linear classifier.

    Args:
        local_dims: widths of the three inverted-residual stages.
        local_depths: their depths.
        global_dim: width of the graph stage.
        global_depth: its number of Grapher + FFN blocks.
        head_dim: width of the head's 1x1 conv (the pre-logits features).
        hop: K, the hop distance of the graph aggregation.
        layer_scale_init_value: initial layer scale of the inverted-residual blocks.
        in_chans, num_classes, global_pool: timm's usual meaning.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly over all blocks.
        act_layer: activation.
    """

    pool_flatten = False

    def __init__(
            self,
            local_dims: Sequence[int] = (42, 84, 224),
            local_depths: Sequence[int] = (3, 3, 9),
            global_dim: int = 400,
            global_depth: int = 3,
            head_dim: int = 768,
            hop: int = 2,
            layer_scale_init_value: float = 1e-5,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            ConvNormAct(in_chans, local_dims[0] // 2, 3, 2, bias=True, act_layer=act_layer),
            ConvNormAct(local_dims[0] // 2, local_dims[0], 3, 2, bias=True, act_layer=act_layer),
        )
        dpr = calculate_drop_path_rates(drop_path_rate, [*local_depths, global_depth], stagewise=True)
        stages = []
        in_chs = local_dims[0]
        for i, (dim, depth) in enumerate(zip(local_dims, local_depths)):
            blocks = [InvertedResidual(dim, 4.0, layer_scale_init_value, dpr[i][j], act_layer) for j in range(depth)]
            stages.append(Stage(blocks, _downsample(in_chs, dim) if i > 0 else None))
            in_chs = dim
        graph_blocks = [GraphBlock(global_dim, hop, dpr[-1][j], act_layer) for j in range(global_depth)]
        stages.append(Stage(graph_blocks, _downsample(in_chs, global_dim)))
        self.stages = nn.Sequential(*stages)
        for i, dim in enumerate([*local_dims, global_dim]):
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.norm = nn.Identity()
        self.conv_head = nn.Conv2d(global_dim, head_dim, 1)
        self.norm_head = BatchNormAct2d(head_dim, act_layer=act_layer)
        self._init_head(global_dim, num_classes, global_pool, drop_rate, head_hidden_size=head_dim)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(".ls.gamma")}

    def _remove_head(self) -> None:
        self.conv_head, self.norm_head = nn.Identity(), nn.Identity()
        self.head_hidden_size = self.num_features
        super()._remove_head()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm_head(self.conv_head(self.global_pool(x)))
        if not self.global_pool.is_identity():  # no pooling ('') keeps the 4-D map
            x = x.flatten(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


# original sub-module names -> ours, per kind of block
_LOCAL_BLOCK = {"mlp.fc1.": "conv_pw.conv.", "mlp.norm1.": "conv_pw.bn.", "mlp.mid.": "conv_dw.conv.",
                "mlp.mid_norm.": "conv_dw.bn.", "mlp.fc2.": "conv_pwl.conv.", "mlp.norm2.": "conv_pwl.bn.",
                "layer_scale_2": "ls.gamma"}
_DOWNSAMPLE = {"conv.0.": "conv.", "conv.1.": "bn."}
_GRAPH_BLOCK = {"0.fc1.0.": "grapher.fc1.conv.", "0.fc1.1.": "grapher.fc1.bn.",
                "0.graph_conv.nn.0.": "grapher.graph_proj.conv.", "0.graph_conv.nn.1.": "grapher.graph_proj.bn.",
                "0.fc2.0.": "grapher.fc2.conv.", "0.fc2.1.": "grapher.fc2.bn.", "1.fc1.0.": "ffn.fc1.conv.",
                "1.fc1.1.": "ffn.fc1.bn.", "1.fc2.0.": "ffn.fc2.conv.", "1.fc2.1.": "ffn.fc2.bn."}
_OTHER = {"stem.stem.0.": "stem.0.conv.", "stem.stem.1.": "stem.0.bn.", "stem.stem.3.": "stem.1.conv.",
          "stem.stem.4.": "stem.1.bn.", "prediction.1.": "conv_head.", "prediction.2.": "norm_head."}



def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: MobileViG) -> dict[str, torch.Tensor]:
    """Map the original layout onto ours: ``local_backbone.N`` (downsamples and inverted-residual blocks in one
    flat list, ending with the transition to the graph stage), ``backbone.N`` (Grapher + FFN pairs),
    ``prediction`` and a 1x1-conv ``head``. A distillation head (``dist_head``) is merged into ``head``: at
    inference the original averages the two heads, which is the same linear map."""
    if "stem.0.conv.weight" in state_dict:
        return state_dict
    local, graph = [], []  # our module prefix and rename table, in the original's list order
    for i, stage in enumerate(model.stages):
        order = graph if i == len(model.stages) - 1 else local
        if not isinstance(stage.downsample, nn.Identity):
            local.append((f"stages.{i}.downsample.", _DOWNSAMPLE))
        order.extend((f"stages.{i}.blocks.{j}.", _LOCAL_BLOCK if order is local else _GRAPH_BLOCK)
                     for j in range(len(stage.blocks)))
    out = {}
    for k, v in state_dict.items():
        if k.startswith(("local_backbone.", "backbone.")):
            part, n, rest = k.split(".", 2)
            prefix, table = (local if part == "local_backbone" else graph)[int(n)]
            k = prefix + rename_prefix(rest, table, "MobileViG")
            if k.endswith(".ls.gamma"):
                v = v.reshape(-1)
        elif k.startswith(("head.", "dist_head.")):
            v = v.reshape(v.shape[0], -1) if v.ndim == 4 else v
            if "dist_head.weight" in state_dict:
                other = "dist_head." if k.startswith("head.") else "head."
                v = (v + state_dict[other + k.split(".", 1)[1]].reshape(v.shape)) / 2
            k = "head." + k.split(".", 1)[1]
        else:
            k = rename_prefix(k, _OTHER, "MobileViG")
        out[k] = v
    return out


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return featured_cfg(
        first_conv="stem.0.conv", origin_url="https://github.com/SLDGroup/MobileViG",
        paper_ids="arXiv:2307.00395", **kwargs)


default_cfgs = generate_default_cfgs({
    "mobilevig_ti.untrained": _cfg(),
    "mobilevig_s.untrained": _cfg(),
    "mobilevig_m.untrained": _cfg(),
    "mobilevig_b.untrained": _cfg(),
})


def _create_mobilevig(variant: str, pretrained: bool = False, **kwargs: Any) -> MobileViG:
    check_output_stride("MobileViG", kwargs.pop("output_stride", 32))
    return build_model_with_cfg(
        MobileViG, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


# aliases: the names the original benchmark (`eval_cls_model.py --other`) accepts
@record(aliases=("mobilevigti",))
@register_model
def mobilevig_ti(pretrained: bool = False, **kwargs: Any) -> MobileViG:
    """MobileViG-Ti (4.8M)."""
    model_args = dict(local_dims=(42, 84, 168), local_depths=(2, 2, 6), global_dim=256, global_depth=2,
                      head_dim=512)
    return _create_mobilevig("mobilevig_ti", pretrained, **dict(model_args, **kwargs))


@record(aliases=("mobilevigs",))
@register_model
def mobilevig_s(pretrained: bool = False, **kwargs: Any) -> MobileViG:
    """MobileViG-S."""
    model_args = dict(local_dims=(42, 84, 176), local_depths=(3, 3, 9), global_dim=256, global_depth=3,
                      head_dim=512)
    return _create_mobilevig("mobilevig_s", pretrained, **dict(model_args, **kwargs))


@record(aliases=("mobilevigm",))
@register_model
def mobilevig_m(pretrained: bool = False, **kwargs: Any) -> MobileViG:
    """MobileViG-M (13.3M)."""
    model_args = dict(local_dims=(42, 84, 224), local_depths=(3, 3, 9), global_dim=400, global_depth=3,
                      head_dim=768)
    return _create_mobilevig("mobilevig_m", pretrained, **dict(model_args, **kwargs))


@record(aliases=("mobilevigb",))
@register_model
def mobilevig_b(pretrained: bool = False, **kwargs: Any) -> MobileViG:
    """MobileViG-B."""
    model_args = dict(local_dims=(42, 84, 240), local_depths=(5, 5, 15), global_dim=464, global_depth=5,
                      head_dim=768)
    return _create_mobilevig("mobilevig_b", pretrained, **dict(model_args, **kwargs))
