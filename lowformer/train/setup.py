"""The recipe's parts, built from timm's components and hooked where LowFormer's recipe differs.

* optimizer: ``create_optimizer_v2`` with a ``param_group_fn`` exempting parameters whose *name contains*
  a ``no_wd_keys`` entry from weight decay (the original's substring rule);
* schedule: timm's cosine scheduler stepped per micro-batch, with the original's warm-up
  ``warmup_lr + (peak - warmup_lr) (t + 1) / W``;
* EMA: ``ModelEmaV3`` with the original's warm-up ``decay x (1 - exp(-step / 2000))``;
* stochastic depth: timm's ``DropPath`` modules, their rates set by the trainer from the progress;
* convolutions on 1x1 maps (the last stage at CIFAR sizes) run as their centre tap (:func:`center_tap_small_maps`).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from lowformer.checkpoints import to_original_layout
from lowformer.models import create_model
from lowformer.train.config import ConfigError, TrainConfig

__all__ = [
    "build_model", "DropPathSchedule", "no_weight_decay_groups", "build_optimizer", "LowformerCosineScheduler",
    "build_scheduler", "check_schedule", "LowformerEma", "build_criterion", "build_mixup", "CenterTapConv2d",
    "center_tap_small_maps",
]

_logger = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The network of ``net_config`` (any project or timm model), with DropPath modules when the recipe
    uses stochastic depth (their rates are then driven by :class:`DropPathSchedule`)."""
    kwargs: dict[str, Any] = dict(num_classes=num_classes, **cfg.net_config.kwargs)
    if cfg.net_config.dropout:
        kwargs["drop_rate"] = cfg.net_config.dropout
    if cfg.backbone_drop.drop_prob > 0:
        kwargs["drop_path_rate"] = cfg.backbone_drop.drop_prob
    try:
        return create_model(cfg.net_config.name, **kwargs)
    except TypeError as e:
        raise ConfigError(f"net_config: {cfg.net_config.name} does not accept these arguments ({e})") from None


class CenterTapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that, on a 1x1 input with "same" zero padding and stride 1, convolves with the kernel's
    centre tap only: every other tap meets padding, so the result and the gradients are the same, while oneDNN's
    k x k backward on a 1x1 map is pathologically slow (a 3x3 depthwise conv on 128x1024x1x1 takes ~50 ms on
    the CPU, its 1x1 equivalent well under 1 ms). Same parameters and state dict as ``nn.Conv2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        if (x.shape[-2:] == (1, 1) and (kh, kw) != (1, 1) and self.stride == (1, 1) and self.dilation == (1, 1)
                and self.padding == (kh // 2, kw // 2) and self.padding_mode == "zeros" and kh % 2 and kw % 2):
            w = self.weight[:, :, kh // 2:kh // 2 + 1, kw // 2:kw // 2 + 1]
            return F.conv2d(x, w, self.bias, 1, 0, 1, self.groups)
        return super().forward(x)


def center_tap_small_maps(model: nn.Module) -> nn.Module:
    """Turns every plain ``nn.Conv2d`` of ``model`` into a :class:`CenterTapConv2d` in place (exact; weights,
    names and checkpoints unchanged) and returns ``model``."""
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = CenterTapConv2d
    return model


class DropPathSchedule:
    """Stochastic depth as the original schedules it: block i of the N after the first ``skip`` gets
    ``drop_prob x (i + 1) / N`` (``linear_decay``, else ``drop_prob``), scaled by the training progress
    (0 during warm-up, 1 at the last step)."""

    def __init__(self, model: nn.Module, drop_prob: float, linear_decay: bool = True, skip: int = 0) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, DropPath)]
        if drop_prob > 0 and not self.modules:
            _logger.warning("backbone_drop.drop_prob=%g but the model has no DropPath modules: no stochastic depth",
                            drop_prob)
        n = max(0, len(self.modules) - skip)
        self.max_probs = [0.0] * min(skip, len(self.modules)) + [
            drop_prob * (i + 1) / n if linear_decay else drop_prob for i in range(n)]
        self.set_progress(0.0)

    def set_progress(self, progress: float) -> None:
        scale = min(max(progress, 0.0), 1.0)
        for module, p in zip(self.modules, self.max_probs):
            module.drop_prob = p * scale


def no_weight_decay_groups(model: nn.Module, weight_decay: float, no_wd_keys: Iterable[str],
                           lr_scale: Mapping[str, float] | None = None) -> list[dict]:
    """Parameter groups: no decay for every parameter whose name contains one of ``no_wd_keys``, and
    ``lr_scale`` (timm's per-group key, which its schedulers multiply into the lr) for every parameter whose
    own name starts with one of ``lr_scale``'s prefixes (the longest matching prefix wins).

    No-decay names are the original repository's where the family registered its layout (LowFormer), so the
    rule decays exactly what the original decays: the GroupNorm pre-norms (``...main.0.weight``) and the
    attention BNs (``...conv_proj.1.weight``) but not the head LayerNorm (``head.op_list.2.norm``)."""
    keys = tuple(no_wd_keys)
    prefixes = sorted((lr_scale or {}).items(), key=lambda kv: -len(kv[0]))
    params = dict(model.named_parameters())
    # the two unscaled groups always exist, in this order, so optimizer states of older runs still load
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(False, 1.0): [], (True, 1.0): []}
    for name, original, p in zip(params, to_original_layout(params, model), params.values()):
        if p.requires_grad:
            scale = next((float(f) for prefix, f in prefixes if name.startswith(prefix)), 1.0)
            groups.setdefault((any(k in original for k in keys), scale), []).append(p)
    out = []
    for (no_decay, scale), ps in sorted(groups.items(), key=lambda kv: (kv[0][1] != 1.0, kv[0])):
        group = dict(params=ps, weight_decay=0.0 if no_decay else weight_decay)
        if scale != 1.0:
            group["lr_scale"] = scale
        out.append(group)
    return out


def check_lr_scale(model: nn.Module, lr_scale: Mapping[str, float]) -> None:
    """Every ``run_config.lr_scale`` prefix must name some parameter and carry a factor >= 0."""
    names = [n for n, _ in model.named_parameters()]
    for prefix, factor in lr_scale.items():
        if not isinstance(factor, (int, float)) or factor < 0:
            raise ConfigError(f"config key 'run_config.lr_scale.{prefix}': {factor!r} is not a number >= 0")
        if not any(n.startswith(prefix) for n in names):
            top = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"config key 'run_config.lr_scale': no parameter name starts with '{prefix}' "
                              f"(top-level modules: {', '.join(top)})")


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2
    rc = cfg.run_config
    params = dict(rc.optimizer_params)
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    check_lr_scale(model, rc.lr_scale)
    try:
        return create_optimizer_v2(
            model, opt=rc.optimizer_name, lr=lr, weight_decay=rc.weight_decay,
            param_group_fn=lambda m: no_weight_decay_groups(m, rc.weight_decay, rc.no_wd_keys, rc.lr_scale),
            **params)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"run_config.optimizer_name/optimizer_params: {e}") from None


class LowformerCosineScheduler(CosineLRScheduler):
    """timm's cosine-after-warm-up schedule with the original's warm-up formula (step t reaches the
    peak at t = W - 1, then ``0.5 peak (1 + cos(pi (t - W) / T))``)."""

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + (v - self.warmup_lr_init) * (t + 1) / self.warmup_t for v in self.base_values]
        return super()._get_lr(t)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, warmup: int,
                    total: int) -> LowformerCosineScheduler:
    """Per-micro-batch cosine schedule: ``warmup`` steps of warm-up, then ``total`` cosine steps."""
    rc = cfg.run_config
    check_schedule(cfg)
    return LowformerCosineScheduler(optimizer, t_initial=total, lr_min=0.0, warmup_t=warmup,
                                    warmup_lr_init=rc.warmup_lr, warmup_prefix=True, t_in_epochs=False)


def check_schedule(cfg: TrainConfig) -> None:
    rc = cfg.run_config
    if rc.lr_schedule_name != "cosine" or rc.lr_schedule_param:
        raise ConfigError("run_config.lr_schedule_name: only 'cosine' with empty lr_schedule_param is supported")


class LowformerEma(ModelEmaV3):
    """EMA of weights and buffers with the original's warm-up: ``decay x (1 - exp(-step / 2000))``."""

    def get_decay(self, step: int | None = None) -> float:
        if step is None:
            return self.decay
        return self.decay * (1.0 - math.exp(-step / 2000.0))


def build_criterion(cfg: TrainConfig) -> nn.Module:
    """BCE (mean over batch x classes) or cross-entropy, both on soft (smoothed / mixed) targets."""
    from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
    return BinaryCrossEntropy(smoothing=0.0) if cfg.run_config.bce else SoftTargetCrossEntropy()


def build_mixup(cfg: TrainConfig, num_classes: int) -> Any:
    """timm's ``Mixup`` for the op list ``[[mixup, alpha, w], [cutmix, alpha, w]]``: one op per batch,
    chosen in proportion to the weights, labels smoothed by ``label_smooth``; None without mixing."""
    from timm.data import Mixup
    mc = cfg.run_config.mixup_config
    if mc is None or not mc.op:
        return None
    alphas, weights = {"mixup": 0.0, "cutmix": 0.0}, {"mixup": 0.0, "cutmix": 0.0}
    for name, alpha, weight in mc.op:
        if name not in alphas:
            raise ConfigError(f"run_config.mixup_config.op: unknown op '{name}' (use mixup or cutmix)")
        alphas[name], weights[name] = alpha, weight
    total = weights["mixup"] + weights["cutmix"]
    return Mixup(mixup_alpha=alphas["mixup"] if weights["mixup"] else 0.0,
                 cutmix_alpha=alphas["cutmix"] if weights["cutmix"] else 0.0,
                 prob=1.0, switch_prob=weights["cutmix"] / total if total else 0.0, mode="batch",
                 label_smoothing=cfg.run_config.label_smooth, num_classes=num_classes)
