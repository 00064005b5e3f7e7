"""EfficientMod

Paper: "Efficient Modulation for Vision Networks", Xu Ma, Xiyang Dai, Jianwei Yang, Bin Xiao, Yinpeng Chen,
Yun Fu, Lu Yuan, ICLR 2024 - https://arxiv.org/abs/2403.19963
Original code: https://github.com/ma-xu/EfficientMod (vendored by LowFormer as
``other_models/efficientModulation.py``, whose checkpoint layout ``checkpoint_filter_fn`` reads).

@inproceedings{ma2024efficient,
  title={Efficient Modulation for Vision Networks},
  author={Ma, Xu and Dai, Xiyang and Yang, Jianwei and Xiao, Bin and Chen, Yinpeng and Fu, Yun and Yuan, Lu},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2024}
}

Re-implemented for lowformer in timm's layout. Stages take and return NCHW maps (so feature extraction and
pooling work as for any CNN); inside a stage the blocks run channels-last with ``Linear`` pointwise layers,
as the original does. No BatchNorm, nothing to re-parameterise.
"""

from typing import Any, Sequence

import torch
import torch.nn as nn
from timm.layers import Attention, DropPath, LayerNorm2d, LayerScale, calculate_drop_path_rates
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from lowformer.models._api import StagedModel, init_linear
from lowformer.models._dense import check_output_stride
from lowformer.models._registry import record
from lowformer.models.featured._base import featured_cfg

__all__ = ["EfficientMod"]


class ConvNorm(nn.Module):
    """Strided conv + LayerNorm over channels: the stem (7x7 / 4) and the stage-entry downsampling (3x3 / 2)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2)
        self.norm = LayerNorm2d(out_chs, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Modulation(nn.Module):
    """Context modulation on channels-last maps.

    value = act(fc1(x)) widened to r*C; context = ctx_out(act(dw_conv(ctx_in(x)))) at width C, tiled r times;
    output = fc2(value * context). With r = 1 the value path has no activation, as in the original.
    """

    def __init__(self, dim: int, expansion: int, kernel_size: int = 7, act_layer: type[nn.Module] = nn.GELU,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.expansion = expansion
        self.fc1 = nn.Linear(dim, dim * expansion)
        self.act = act_layer() if expansion > 1 else nn.Identity()
        self.drop = nn.Dropout(proj_drop)
        self.ctx_in = nn.Linear(dim, dim)
        self.ctx_conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.ctx_act = act_layer()
        self.ctx_out = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim * expansion, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx_act(self.ctx_conv(self.ctx_in(x).permute(0, 3, 1, 2)))
        ctx = self.ctx_out(ctx.permute(0, 2, 3, 1))
        x = self.drop(self.act(self.fc1(x)))
        if self.expansion > 1:
            ctx = ctx.repeat(1, 1, 1, self.expansion)
        return self.fc2(x * ctx)


class ModulationBlock(nn.Module):
    """Pre-norm residual modulation block with a learnable per-channel layer scale (channels-last)."""

    def __init__(self, dim: int, expansion: int, kernel_size: int = 7, layer_scale_init_value: float = 1e-4,
                 proj_drop: float = 0.0, drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm_layer(dim)
        self.mod = Modulation(dim, expansion, kernel_size, act_layer, proj_drop)
        self.ls = LayerScale(dim, layer_scale_init_value)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ls(self.mod(self.norm(x))))


class WideHeadAttention(Attention):
    """timm's multi-head self-attention with heads at least 32 wide: ``num_heads * max(dim // num_heads, 32)``
    inner channels, so the qkv / proj width exceeds ``dim`` for narrow stages (256 for dim 128 or 144)."""

    def __init__(self, dim: int, num_heads: int = 8, **kwargs: Any) -> None:
        super().__init__(dim, num_heads=num_heads, attn_head_dim=max(dim // num_heads, 32), **kwargs)


class EfficientModStage(nn.Module):
    """Optional downsampling, modulation blocks, then plain transformer blocks. NCHW in and out."""

    def __init__(self, in_chs: int, dim: int, depth: int, attn_depth: int, expansions: Sequence[int],
                 attn_mlp_ratio: float, kernel_size: int, num_heads: int, layer_scale_init_value: float,
                 downsample: bool, proj_drop: float, drop_path: Sequence[float], act_layer: type[nn.Module],
                 norm_layer: type[nn.Module]) -> None:
        super().__init__()
        self.downsample = ConvNorm(in_chs, dim, 3, 2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            ModulationBlock(dim, expansions[i % len(expansions)], kernel_size, layer_scale_init_value, proj_drop,
                            drop_path[i], act_layer, norm_layer)
            for i in range(depth)])
        self.attn_blocks = nn.Sequential(*[
            Block(dim, num_heads, attn_mlp_ratio, proj_drop=proj_drop, drop_path=drop_path[depth + i],
                  act_layer=act_layer, norm_layer=norm_layer, attn_layer=WideHeadAttention)
            for i in range(attn_depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)
        x = self.blocks(x)
        if len(self.attn_blocks):
            shape = x.shape  # not unpacked, so torch.fx can trace it
            x = self.attn_blocks(x.flatten(1, 2)).reshape(shape)
        return x.permute(0, 3, 1, 2)


class EfficientMod(StagedModel):
    """EfficientMod: four stages of modulation blocks, later ones followed by attention blocks.

    Args:
        embed_dims: width of each stage (the stem outputs the first).
        depths: modulation blocks per stage.
        attn_depths: transformer blocks after them per stage.
        expansions: per stage, the repeating pattern of the modulation blocks' expansion r (e.g. (1, 4):
            blocks alternate r = 1 and r = 4).
        attn_mlp_ratios: MLP ratio of each stage's transformer blocks.
        kernel_size: depthwise kernel of the context branch.
        num_heads: attention heads (each at least 32 channels wide).
        layer_scale_init_value: initial layer scale of the modulation blocks.
        in_chans, num_classes, global_pool: timm's usual meaning.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout inside the blocks.
        drop_path_rate: stochastic depth, rising linearly over all blocks.
        act_layer, norm_layer: activation and (channels-last) norm.
    """

    def __init__(
            self,
            embed_dims: Sequence[int] = (32, 64, 144, 288),
            depths: Sequence[int] = (3, 3, 4, 2),
            attn_depths: Sequence[int] = (0, 0, 3, 3),
            expansions: Sequence[Sequence[int]] = ((1, 4),) * 4,
            attn_mlp_ratios: Sequence[float] = (4, 4, 4, 4),
            kernel_size: int = 7,
            num_heads: int = 8,
            layer_scale_init_value: float = 1e-4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.stem = ConvNorm(in_chans, embed_dims[0], 7, 4)
        # per block, rising over the whole network; returned split by stage
        dpr = calculate_drop_path_rates(drop_path_rate, [d + a for d, a in zip(depths, attn_depths)],
                                        stagewise=True)
        stages = []
        in_chs = embed_dims[0]
        for i, dim in enumerate(embed_dims):
            stages.append(EfficientModStage(
                in_chs, dim, depths[i], attn_depths[i], expansions[i], attn_mlp_ratios[i], kernel_size, num_heads,
                layer_scale_init_value, i > 0, proj_drop_rate, dpr[i], act_layer, norm_layer))
            in_chs = dim
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = LayerNorm2d(embed_dims[-1], eps=1e-5)
        self._init_head(embed_dims[-1], num_classes, global_pool, drop_rate)
        self.apply(init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(".ls.gamma")}


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: EfficientMod) -> dict[str, torch.Tensor]:
    """Map the original layout (``patch_embed``, ``layers.N.blocks.M`` with the attention blocks numbered after
    the modulation blocks, ``layers.N.downsample`` at the end of the previous stage) onto ours."""
    if "stem.conv.weight" in state_dict:
        return state_dict
    depths = [len(stage.blocks) for stage in model.stages]
    out = {}
    for k, v in state_dict.items():
        k = k.replace("patch_embed.proj.", "stem.conv.").replace("patch_embed.", "stem.")
        if k.startswith("layers."):
            _, i, part, rest = k.split(".", 3)
            i = int(i)
            if part == "downsample":
                k = f"stages.{i + 1}.downsample." + rest.replace("proj.", "conv.", 1)
            else:
                j, rest = rest.split(".", 1)
                j = int(j)
                if j >= depths[i]:
                    k = f"stages.{i}.attn_blocks.{j - depths[i]}.{rest}"
                else:
                    rest = (rest.replace("gamma_1", "ls.gamma").replace("mlp.context_layer.f.", "mod.ctx_in.")
                            .replace("mlp.context_layer.g.", "mod.ctx_out.")
                            .replace("mlp.context_layer.context_list.0.", "mod.ctx_conv.")
                            .replace("mlp.", "mod."))
                    k = f"stages.{i}.blocks.{j}.{rest}"
        out[k] = v
    return out


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return featured_cfg(
        first_conv="stem.conv", origin_url="https://github.com/ma-xu/EfficientMod",
        paper_ids="arXiv:2403.19963", **kwargs)


default_cfgs = generate_default_cfgs({
    "efficientmod_xxs.untrained": _cfg(),
    "efficientmod_xs.untrained": _cfg(),
    "efficientmod_s.untrained": _cfg(),
    "efficientmod_s_conv.untrained": _cfg(),
})


def _create_efficientmod(variant: str, pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    check_output_stride("EfficientMod", kwargs.pop("output_stride", 32))
    return build_model_with_cfg(
        EfficientMod, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


# aliases: the names the original benchmark (`eval_cls_model.py --other`) accepts
@record(aliases=("efficientmodxxs",))
@register_model
def efficientmod_xxs(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """EfficientMod-XXS (4.7M)."""
    model_args = dict(embed_dims=(32, 64, 128, 256), depths=(2, 2, 6, 2), attn_depths=(0, 0, 1, 2),
                      expansions=((1, 6),) * 4, attn_mlp_ratios=(4, 4, 4, 4))
    return _create_efficientmod("efficientmod_xxs", pretrained, **dict(model_args, **kwargs))


@record(aliases=("efficientmodxs",))
@register_model
def efficientmod_xs(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """EfficientMod-XS (6.6M)."""
    model_args = dict(embed_dims=(32, 64, 144, 288), depths=(3, 3, 4, 2), attn_depths=(0, 0, 3, 3),
                      expansions=((1, 4),) * 4, attn_mlp_ratios=(4, 4, 4, 4))
    return _create_efficientmod("efficientmod_xs", pretrained, **dict(model_args, **kwargs))


@record(aliases=("efficientmods",))
@register_model
def efficientmod_s(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """EfficientMod-S (12.9M); its last stage's attention MLPs have ratio 5."""
    model_args = dict(embed_dims=(32, 64, 144, 312), depths=(4, 4, 8, 4), attn_depths=(0, 0, 4, 4),
                      expansions=((1, 6),) * 4, attn_mlp_ratios=(4, 4, 4, 5))
    return _create_efficientmod("efficientmod_s", pretrained, **dict(model_args, **kwargs))


@record(aliases=("efficientmods_Conv",))
@register_model
def efficientmod_s_conv(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """EfficientMod-S-Conv: modulation blocks only, no attention."""
    model_args = dict(embed_dims=(40, 80, 160, 344), depths=(4, 4, 12, 8), attn_depths=(0, 0, 0, 0),
                      expansions=((1, 6),) * 4)
    return _create_efficientmod("efficientmod_s_conv", pretrained, **dict(model_args, **kwargs))
