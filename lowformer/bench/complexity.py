"""Parameters and MACs in the papers' convention.

MACs count convolutions (transposed ones at their input resolution), linear layers and the attention
matmuls; nothing for norms, activations, softmax, pooling or additions. That is what
``torch.utils.flop_counter`` prices (FLOPs / 2), once the CPU fused-attention kernel, which it does not
know, is given the same formula as the other SDPA kernels. With this rule LowFormer-B0 is 944.0M MACs,
the paper's figure.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["count_params", "count_macs", "paper_resolution", "model_complexity"]

_logger = logging.getLogger(__name__)
aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers excluded), as the papers report them."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224), batch_size: int = 1) -> int:
    """MACs of one forward pass of ``model`` (eval mode) on a ``batch_size`` x ``input_size`` input.

    Works on CPU or meta tensors: the input is created on the device of the model's parameters."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    x = torch.zeros(batch_size, *input_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    try:
        with counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def paper_resolution(model: nn.Module) -> int:
    """The square input side at which the family's paper reports MACs (from its ``pretrained_cfg``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def model_complexity(name: str, image_size: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """Params and MACs of a model by name, at ``image_size`` or the family's paper resolution.

    The model is built on the meta device (no memory, no weights initialised); a family that cannot run
    on meta tensors is built on the CPU instead."""
    from lowformer.models import create_model
    from lowformer.segmentation import is_segmenter_spec, segmenter_from_spec
    if is_segmenter_spec(name):  # segmenters: mmseg's 2048x512 unless a size is given
        model = segmenter_from_spec(name)
        h, w = (image_size, image_size) if image_size else (512, 2048)
        return {"model": name, "params": count_params(model), "macs": count_macs(model, (3, h, w)),
                "image_size": h, "image_width": w}
    try:
        with torch.device("meta"):
            model = create_model(name, **kwargs)
        size = image_size or paper_resolution(model)
        macs = count_macs(model, (3, size, size))
    except (NotImplementedError, RuntimeError) as e:
        _logger.debug("meta-device count failed for %s (%s); counting on the CPU", name, e)
        model = create_model(name, **kwargs)
        size = image_size or paper_resolution(model)
        macs = count_macs(model, (3, size, size))
    return {"model": name, "params": count_params(model), "macs": macs, "image_size": size}
