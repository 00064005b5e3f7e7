"""FFNet (Fast-Forward Networks)

Paper: "FFNet: MetaMixer-based Efficient Convolutional Mixer Design" (first titled "MetaMixer Is All You
Need"), Seokju Yun, Dongheon Lee, Youngmin Ro, 2024 - https://arxiv.org/abs/2406.02021
Original code: https://github.com/ysj9909/FFNet (vendored by LowFormer as ``other_models/ffnet.py``, whose
checkpoint layout ``checkpoint_filter_fn`` reads).

@article{yun2024metamixer,
  title={FFNet: MetaMixer-based Efficient Convolutional Mixer Design},
  author={Yun, Seokju and Lee, Dongheon and Ro, Youngmin},
  journal={arXiv preprint arXiv:2406.02021},
  year={2024}
}

Re-implemented for lowformer in timm's layout. The multi-branch parts fold into single convolutions for
inference through ``reparameterize()`` on the blocks (``timm.utils.reparameterize_model`` calls them): the
7x7 + 3x3 depthwise pairs become one 7x7 depthwise conv, every Conv-BN one conv, and the stage-entry
BN -> 1x1 conv + identity one 1x1 conv. FFNet-3/4 use layer scale, which the vendored original fails to
build (it assigns a plain tensor over the parameter); here it is a parameter, as the original intends.
"""

from typing import Any, Sequence

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale2d, calculate_drop_path_rates, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.nn.utils.fusion import fuse_conv_bn_weights

from lowformer.models._api import StagedModel
from lowformer.models._dense import check_output_stride
from lowformer.models._registry import record
from lowformer.models.featured._base import Stage, featured_cfg, rename_prefix

__all__ = ["FFNet"]


class ConvBn(nn.Module):
    """Conv (no bias) + BatchNorm; ``reparameterize()`` folds the BN into the conv."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x))

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of the equivalent single conv (eval-mode BN statistics)."""
        if isinstance(self.bn, nn.Identity):
            return self.c.weight, self.c.bias
        bn = self.bn
        return fuse_conv_bn_weights(self.c.weight, None, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                    bn.bias)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if isinstance(self.bn, nn.Identity):
            return
        weight, bias = self.fused_weights()
        c = self.c
        self.c = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups,
                           device=weight.device, dtype=weight.dtype)
        self.c.weight.copy_(weight)
        self.c.bias.copy_(bias)
        self.bn = nn.Identity()


class RepDwConv(nn.Module):
    """Depthwise-grouped 7x7 and 3x3 Conv-BN branches in parallel, summed (groups = input channels, so an
    output width of twice the input gives each input channel two outputs); one 7x7 conv after
    ``reparameterize()``."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 7, stride: int = 1) -> None:
        super().__init__()
        self.large = ConvBn(in_chs, out_chs, kernel_size, stride, groups=in_chs)
        self.small = ConvBn(in_chs, out_chs, kernel_size // 2, stride, groups=in_chs)
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return self.large(x) + self.small(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        w_large, b_large = self.large.fused_weights()
        w_small, b_small = self.small.fused_weights()
        pad = (w_large.shape[-1] - w_small.shape[-1]) // 2
        c = self.large.c
        self.reparam_conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                                      groups=c.groups, device=w_large.device, dtype=w_large.dtype)
        self.reparam_conv.weight.copy_(w_large + nn.functional.pad(w_small, [pad] * 4))
        self.reparam_conv.bias.copy_(b_large + b_small)
        del self.large, self.small


class BnConvSkip(nn.Module):
    """BatchNorm -> 1x1 conv (no bias), plus the input; one 1x1 conv with bias after ``reparameterize()``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, dim, 1, bias=False)
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return self.conv(self.bn(x)) + x

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        bn, weight = self.bn, self.conv.weight[:, :, 0, 0]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        dim = weight.shape[0]
        self.reparam_conv = nn.Conv2d(dim, dim, 1, device=weight.device, dtype=weight.dtype)
        eye = torch.eye(dim, device=weight.device, dtype=weight.dtype)
        self.reparam_conv.weight.copy_((weight * scale[None, :] + eye)[:, :, None, None])
        self.reparam_conv.bias.copy_(weight @ shift)
        del self.bn, self.conv


def _dw_conv(dim: int, kernel_size: int, plain: bool) -> nn.Module:
    """7 -> the 7x7 + 3x3 pair; otherwise a depthwise conv, plain with bias or Conv-BN."""
    if kernel_size == 7:
        return RepDwConv(dim, dim, 7)
    if plain:
        return nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
    return ConvBn(dim, dim, kernel_size, groups=dim)


class TokenMixer(nn.Module):
    """FFNified attention: 1x1 Conv-BN, depthwise conv, act, depthwise conv."""

    def __init__(self, dim: int, kernel_size1: int, kernel_size2: int, act_layer: type[nn.Module]) -> None:
        super().__init__()
        self.fc = ConvBn(dim, dim)
        self.conv1 = _dw_conv(dim, kernel_size1, plain=True)
        self.act = act_layer()
        self.conv2 = _dw_conv(dim, kernel_size2, plain=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(self.fc(x))))


class ChannelMixer(nn.Module):
    """Depthwise Conv-BN (or the 7x7 + 3x3 pair), 1x1 conv to ``expansion`` x width, act, 1x1 conv back."""

    def __init__(self, dim: int, kernel_size: int, expansion: float, act_layer: type[nn.Module]) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.dw = _dw_conv(dim, kernel_size, plain=False)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.dw(x))))


class FFBlock(nn.Module):
    """Residual token mixer, then residual channel mixer (optional layer scale, one drop-path rate)."""

    def __init__(self, dim: int, kernel_size: int, kernel_size1: int, kernel_size2: int, expansion: float,
                 layer_scale_init_value: float | None, drop_path: float, act_layer: type[nn.Module]) -> None:
        super().__init__()
        self.token_mixer = TokenMixer(dim, kernel_size1, kernel_size2, act_layer)
        self.ls1 = LayerScale2d(dim, layer_scale_init_value) if layer_scale_init_value else nn.Identity()
        self.channel_mixer = ChannelMixer(dim, kernel_size, expansion, act_layer)
        self.ls2 = LayerScale2d(dim, layer_scale_init_value) if layer_scale_init_value else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.token_mixer(x)))
        return x + self.drop_path(self.ls2(self.channel_mixer(x)))


class PatchMerge(nn.Module):
    """Stage entry: stride-2 7x7 + 3x3 depthwise pair widening the channels, then BN -> 1x1 conv + identity."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.dw = RepDwConv(in_chs, out_chs, 7, stride=2)
        self.pw = BnConvSkip(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class FFNet(StagedModel):
    """FFNet: Conv-BN stem (stride 4), four stages of FFNified-attention blocks, BatchNorm, pool, linear.

    Args:
        embed_dims: stage widths.
        depths: blocks per stage.
        stem_dim: width of the first stem conv.
        kernel_sizes: channel mixer's depthwise kernel per stage (7 = the 7x7 + 3x3 pair).
        kernel_sizes1, kernel_sizes2: the token mixer's two depthwise kernels per stage (7 = the pair,
            otherwise a plain depthwise conv with bias).
        expansions: channel mixer's expansion per stage.
        layer_scale_init_value: initial layer scale; None for none (FFNet-1/2).
        in_chans, num_classes, global_pool: timm's usual meaning.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly over all blocks.
        act_layer: activation.
    """

    def __init__(
            self,
            embed_dims: Sequence[int] = (80, 160, 320, 640),
            depths: Sequence[int] = (2, 2, 8, 2),
            stem_dim: int = 64,
            kernel_sizes: Sequence[int] = (3, 3, 3, 3),
            kernel_sizes1: Sequence[int] = (3, 3, 7, 7),
            kernel_sizes2: Sequence[int] = (3, 3, 7, 7),
            expansions: Sequence[float] = (3, 3, 3, 3),
            layer_scale_init_value: float | None = None,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvBn(in_chans, stem_dim, 3, 2), act_layer(), ConvBn(stem_dim, embed_dims[0], 3, 2))
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        in_chs = embed_dims[0]
        for i, dim in enumerate(embed_dims):
            blocks = [FFBlock(dim, kernel_sizes[i], kernel_sizes1[i], kernel_sizes2[i], expansions[i],
                              layer_scale_init_value, dpr[i][j], act_layer) for j in range(depths[i])]
            stages.append(Stage(blocks, PatchMerge(in_chs, dim) if i > 0 else None))
            in_chs = dim
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self._init_head(embed_dims[-1], num_classes, global_pool, drop_rate)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(".gamma")}


_MERGE = {"proj.0.conv.": "dw.large.", "proj.0.conv1.": "dw.small.", "proj.1.conv.bn.": "pw.bn.",
          "proj.1.conv.c.": "pw.conv."}
_BLOCK = {"token_mixer.0.main.conv1.conv.": "token_mixer.conv1.large.",
          "token_mixer.0.main.conv1.conv1.": "token_mixer.conv1.small.",
          "token_mixer.0.main.conv2.conv.": "token_mixer.conv2.large.",
          "token_mixer.0.main.conv2.conv1.": "token_mixer.conv2.small.",
          "token_mixer.0.main.": "token_mixer.", "token_mixer.0.layer_scale": "ls1.gamma",
          "channel_mixer.main.conv.conv.": "channel_mixer.dw.large.",
          "channel_mixer.main.conv.conv1.": "channel_mixer.dw.small.",
          "channel_mixer.main.conv.": "channel_mixer.dw.", "channel_mixer.main.": "channel_mixer.",
          "channel_mixer.layer_scale": "ls2.gamma"}



def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: FFNet) -> dict[str, torch.Tensor]:
    """Map the original layout onto ours: ``patch_embed`` -> ``stem``; ``stages.N.M`` where stages 2-4 open
    with their ``PatchMerging`` at M = 0 -> ``stages.N.downsample`` / ``stages.N.blocks``; residual wrappers
    (``.main``, ``token_mixer.0``) dropped; layer scales of shape (C, 1, 1) -> (C,)."""
    if "stem.0.c.weight" in state_dict:
        return state_dict
    out = {}
    for k, v in state_dict.items():
        if k.startswith("patch_embed."):
            k = "stem." + k[len("patch_embed."):]
        elif k.startswith("stages."):
            _, i, n, rest = k.split(".", 3)
            i, n = int(i), int(n)
            if i > 0 and n == 0:
                k = f"stages.{i}.downsample." + rename_prefix(rest, _MERGE, "FFNet")
            else:
                k = f"stages.{i}.blocks.{n - (i > 0)}." + rename_prefix(rest, _BLOCK, "FFNet")
                if k.endswith(".gamma"):
                    v = v.reshape(-1)
        out[k] = v
    return out


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return featured_cfg(
        first_conv="stem.0.c", origin_url="https://github.com/ysj9909/FFNet",
        paper_ids="arXiv:2406.02021", **kwargs)


default_cfgs = generate_default_cfgs({
    "ffnet_1.untrained": _cfg(),
    "ffnet_2.untrained": _cfg(),
    "ffnet_3.untrained": _cfg(crop_pct=0.95),
    "ffnet_4.untrained": _cfg(crop_pct=0.95),
})


def _create_ffnet(variant: str, pretrained: bool = False, **kwargs: Any) -> FFNet:
    check_output_stride("FFNet", kwargs.pop("output_stride", 32))
    return build_model_with_cfg(
        FFNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


# aliases: the names the original benchmark (`eval_cls_model.py --other`) accepts; FFNet-3/4 crash there
@record(aliases=("ffnet1",))
@register_model
def ffnet_1(pretrained: bool = False, **kwargs: Any) -> FFNet:
    """FFNet-1 (13.8M): 3x3 channel-mixer depthwise convs."""
    model_args = dict(embed_dims=(80, 160, 320, 640), depths=(2, 2, 8, 2), kernel_sizes=(3, 3, 3, 3))
    return _create_ffnet("ffnet_1", pretrained, **dict(model_args, **kwargs))


@record(aliases=("ffnet2",))
@register_model
def ffnet_2(pretrained: bool = False, **kwargs: Any) -> FFNet:
    """FFNet-2 (27.2M)."""
    model_args = dict(embed_dims=(88, 176, 352, 704), depths=(3, 3, 15, 3), kernel_sizes=(7, 7, 7, 7))
    return _create_ffnet("ffnet_2", pretrained, **dict(model_args, **kwargs))


@record(aliases=("ffnet3",))
@register_model
def ffnet_3(pretrained: bool = False, **kwargs: Any) -> FFNet:
    """FFNet-3, with layer scale."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(4, 4, 22, 5), kernel_sizes=(7, 7, 7, 7),
                      layer_scale_init_value=1e-6)
    return _create_ffnet("ffnet_3", pretrained, **dict(model_args, **kwargs))


@record(aliases=("ffnet4",))
@register_model
def ffnet_4(pretrained: bool = False, **kwargs: Any) -> FFNet:
    """FFNet-4, with layer scale."""
    model_args = dict(embed_dims=(128, 256, 512, 1024), depths=(4, 4, 27, 3), kernel_sizes=(7, 7, 7, 7),
                      layer_scale_init_value=1e-6)
    return _create_ffnet("ffnet_4", pretrained, **dict(model_args, **kwargs))
