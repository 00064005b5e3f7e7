"""One micro-batch of training: loss under autocast, finite check on every rank, backward, and on a
group's last micro-batch gradient clipping, the optimizer step and the EMA update.

Micro-batch gradients of a ``bsizemult`` group are summed (as in the original); DDP all-reduces them
only on the group's last micro-batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from lowformer.errors import LowformerError
from lowformer.evaluate import autocast_context

__all__ = ["AMP_MODES", "LossOutput", "NonFiniteLoss", "StepParts", "amp_mode", "train_step"]

AMP_MODES = ("none", "bf16", "fp16")


class NonFiniteLoss(Exception):
    """The loss of a micro-batch is NaN or infinite on some rank (the trainer turns it into advice)."""

    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


@dataclass
class LossOutput:
    """What a task's ``loss`` returns: the loss, how many samples it covers, dropped samples, log values."""

    loss: torch.Tensor
    samples: int
    skipped: int = 0
    logs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepParts:
    model: nn.Module  # the bare model (the optimizer's parameters)
    ddp: nn.Module  # the model the forward goes through: DistributedDataParallel or ``model`` itself
    optimizer: torch.optim.Optimizer
    ema: Any = None  # timm ModelEmaV3 or None
    scaler: Any = None  # timm NativeScaler for fp16 or None
    amp_dtype: torch.dtype | None = None
    device: torch.device = torch.device("cpu")
    grad_clip: float | None = None
    distributed: bool = False


def amp_mode(mode: str, device: torch.device) -> tuple[torch.dtype | None, Any]:
    """Autocast dtype and loss scaler of an AMP mode; fp16 needs CUDA, bf16 a device that supports it."""
    if mode not in AMP_MODES:
        raise LowformerError(f"amp mode '{mode}': use one of {', '.join(AMP_MODES)}")
    if mode == "none":
        return None, None
    if mode == "fp16":
        if device.type != "cuda":
            raise LowformerError("--amp fp16 needs a CUDA device; use --amp bf16 or none on the CPU")
        from timm.utils import NativeScaler
        return torch.float16, NativeScaler(device="cuda")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LowformerError("--amp bf16: this GPU does not support bfloat16; use --amp fp16")
    return torch.bfloat16, None


def _any_rank_non_finite(loss: torch.Tensor, distributed: bool) -> bool:
    bad = (~torch.isfinite(loss.detach())).float()
    if distributed:
        torch.distributed.all_reduce(bad)
    return bool(bad.item())


def train_step(parts: StepParts, compute_loss: Callable[[nn.Module], LossOutput], *, first: bool, update: bool,
               step: int) -> LossOutput:
    """Run one micro-batch. ``first``: the group's first micro-batch (gradients are zeroed); ``update``:
    its last (clip, optimizer step, EMA update with ``step + 1``). Raises NonFiniteLoss before any
    weight changes when the loss is not finite on some rank."""
    from timm.utils import dispatch_clip_grad
    if first:
        parts.optimizer.zero_grad(set_to_none=True)
    sync = contextlib.nullcontext() if update or parts.ddp is parts.model else parts.ddp.no_sync()
    with sync:
        with autocast_context(parts.device, parts.amp_dtype):
            out = compute_loss(parts.ddp)
        if _any_rank_non_finite(out.loss, parts.distributed):
            raise NonFiniteLoss(float(out.loss.detach().float()))
        params = parts.model.parameters()
        if parts.scaler is not None:
            parts.scaler(out.loss, parts.optimizer, clip_grad=parts.grad_clip, clip_mode="value", parameters=params,
                         need_update=update)
        else:
            out.loss.backward()
            if update:
                if parts.grad_clip is not None:
                    dispatch_clip_grad(params, parts.grad_clip, mode="value")
                parts.optimizer.step()
    if update and parts.ema is not None:
        parts.ema.update(parts.model, step=step + 1)
    return out
