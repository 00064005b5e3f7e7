"""Parameters and MACs in the papers' convention.

MACs count convolutions (transposed ones at their input resolution), linear layers and the attention
matmuls; nothing for norms, activations, softmax, pooling or additions. That is what
``torch.utils.flop_counter`` prices (FLOPs / 2), once the CPU fused-attention kernel, which it does not
know, is given the same formula as the other SDPA kernels. With this rule LowFormer-B0 is 944.0M MACs,
the paper's figure.

Detectors and segmenters (``ARCH:BACKBONE``) are also counted the way the seeds' tables were, by mmcv's
``get_model_complexity_info`` (mmdet/mmseg ``tools/get_flops.py``), reported there as "FLOPs" but counting
multiply-accumulates: forward hooks on modules of a fixed list of types and nothing else. Convs (with one
add per output for a bias), transposed convs, linears (no bias term), BatchNorm / GroupNorm / LayerNorm /
InstanceNorm (one op per element, two when affine), ReLU-family activations and pooling layers (one per
element), ``nn.Upsample`` (one per output element). Not counted: functional calls (attention matmuls,
``F.interpolate``, ``F.max_pool2d``), GELU / SiLU / Hardswish / sigmoid / softmax, additions, RoIAlign.
So mmcv's figure is above the project's for conv nets with norms (norms and activations added) and
below it for attention backbones at detection resolutions (attention matmuls left out).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["count_params", "count_macs", "count_costs", "paper_resolution", "model_complexity"]

_logger = logging.getLogger(__name__)
aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers excluded), as the papers report them."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224), batch_size: int = 1) -> int:
    """MACs of one forward pass of ``model`` (eval mode) on a ``batch_size`` x ``input_size`` input.

    Works on CPU or meta tensors: the input is created on the device of the model's parameters."""
    return count_costs(model, input_size, batch_size, mmcv=False)[0]


def _mmcv_hook(module: nn.Module, inputs: tuple, output: Any) -> int:
    """mmcv 1.x ``flops_counter``'s count for one call of ``module`` (0 for the types it has no hook for).

    Types match by ``isinstance`` (mmcv matches exact types): a subclass such as timm's ``BatchNormAct2d``
    counts as the nn class it extends, as the seeds' plain modules did."""
    x = inputs[0] if inputs else None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # priced at its input positions
        per_position = math.prod(module.kernel_size) * module.in_channels * (module.out_channels // module.groups)
        flops = per_position * x.shape[0] * math.prod(x.shape[2:])
        if module.bias is not None:
            flops += module.out_channels * output.shape[0] * math.prod(output.shape[2:])
        return flops
    if isinstance(module, nn.modules.conv._ConvNd):
        active = output.shape[0] * math.prod(output.shape[2:])
        per_position = math.prod(module.kernel_size) * module.in_channels * (module.out_channels // module.groups)
        return per_position * active + (module.out_channels * active if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        return x.numel() * output.shape[-1]
    if isinstance(module, _MMCV_NORMS):
        affine = getattr(module, "affine", False) or getattr(module, "elementwise_affine", False) \
            or isinstance(module, FrozenBatchNorm2d)
        return x.numel() * (2 if affine else 1)
    if isinstance(module, _MMCV_ELEMENTWISE):
        return output.numel()
    if isinstance(module, _MMCV_POOLS):
        return x.numel()
    if isinstance(module, nn.Upsample):
        return output[0].numel()
    return 0


def _mmcv_types() -> tuple:
    from torchvision.ops.misc import FrozenBatchNorm2d as Frozen
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm,
             Frozen)  # torchvision's frozen BN stands for mmdet's BN with requires_grad=False
    elementwise = (nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6)
    pools = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
             nn.modules.pooling._AdaptiveAvgPoolNd)
    return Frozen, norms, elementwise, pools


FrozenBatchNorm2d, _MMCV_NORMS, _MMCV_ELEMENTWISE, _MMCV_POOLS = _mmcv_types()


@torch.no_grad()
def count_costs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224), batch_size: int = 1,
                mmcv: bool = True) -> tuple[int, int | None]:
    """(MACs in the project's convention, mmcv's "FLOPs" or None) of one eval-mode forward pass of ``model``
    on a ``batch_size`` x ``input_size`` input of zeros, both from the same pass (module docstring)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    x = torch.zeros(batch_size, *input_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    total = [0]

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        total[0] += _mmcv_hook(module, inputs, output)

    handles = [m.register_forward_hook(hook) for m in model.modules()] if mmcv else []
    try:
        with counter:
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counter.get_total_flops() // 2, (total[0] if mmcv else None)


def paper_resolution(model: nn.Module) -> int:
    """The square input side at which the family's paper reports MACs (from its ``pretrained_cfg``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def _build_and_count(build: Any, size: Any, mmcv: bool) -> tuple[nn.Module, tuple[int, int], tuple[int, Any]]:
    """``build()`` on the meta device (no memory, no weights initialised) and counted there; a model that
    cannot run on meta tensors (data-dependent indexing, e.g. RoIAlign's level mapping) is built on the CPU."""
    from lowformer.dense import cost_module
    try:
        with torch.device("meta"):
            model = build()
        hw = size(model)
        return model, hw, count_costs(cost_module(model), (3, *hw), mmcv=mmcv)
    except (NotImplementedError, RuntimeError, ValueError) as e:
        _logger.debug("meta-device count failed (%s); counting on the CPU", e)
    model = build()
    hw = size(model)
    return model, hw, count_costs(cost_module(model), (3, *hw), mmcv=mmcv)


def model_complexity(name: str, image_size: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """Params and MACs of a model by name, at ``image_size`` or the family's paper resolution.

    A detector or segmenter ``ARCH:BACKBONE`` is counted at mmdet's 1280x800 / mmseg's 2048x512 (or
    ``image_size`` squared), on its backbone, neck and heads (:func:`lowformer.dense.cost_module`), and
    the record adds ``mmcv_flops``: the same pass counted as the seeds' tables were (module docstring)."""
    from lowformer.dense import COMPLEXITY_SIZES, dense_model_from_spec, parse_dense_spec
    from lowformer.models import create_model
    spec = parse_dense_spec(name)
    if spec is not None:
        hw = (image_size, image_size) if image_size else COMPLEXITY_SIZES[spec.task]
        model, (h, w), (macs, mmcv) = _build_and_count(lambda: dense_model_from_spec(name, **kwargs),
                                                       lambda m: hw, mmcv=True)
        return {"model": name, "params": count_params(model), "macs": macs, "mmcv_flops": mmcv,
                "image_size": h, "image_width": w}
    model, (size, _), (macs, _) = _build_and_count(
        lambda: create_model(name, **kwargs), lambda m: (image_size or paper_resolution(m),) * 2, mmcv=False)
    return {"model": name, "params": count_params(model), "macs": macs, "image_size": size}
