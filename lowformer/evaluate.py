"""Top-1 / top-5 over an image folder (the original's ``fast_eval``), and BN statistics re-estimation.

``imagenet_eval(model, data_dir)`` evaluates with the model's own preprocessing from its
``pretrained_cfg`` (or overrides) and returns the metrics as a dict; with ``class_map`` a folder that
holds only some classes is scored in the full class index (e.g. ImageNet wnids -> 0..999).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lowformer.data import ImageFolderDataset, build_eval_loader, eval_transform, read_class_map
from lowformer.errors import LowformerError

if TYPE_CHECKING:
    from lowformer.train.distributed import DistContext

__all__ = ["evaluate", "reestimate_bn", "imagenet_eval", "autocast_context"]

_logger = logging.getLogger(__name__)


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in ``dtype`` on ``device``, or nothing (fp32) when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, ctx: DistContext | None = None,
             amp_dtype: torch.dtype | None = None, progress: bool = False, desc: str = "eval") -> dict[str, Any]:
    """Cross-entropy, top-1 and top-5 (percent) of ``model`` over ``loader`` (batches from
    ``collate_skipping``), summed over ranks when ``ctx`` is distributed; unreadable images are counted
    in ``skipped``, not scored."""
    from tqdm import tqdm
    model.eval()
    correct1 = correct5 = loss_sum = 0.0
    images = skipped = 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for x, y, n_skipped in bar:
        skipped += n_skipped
        if len(y) == 0:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_context(device, amp_dtype):
            out = model(x)
        out = out.float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        top = out.topk(min(5, out.shape[-1]), dim=-1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=-1).sum().item()
        images += len(y)
        bar.set_postfix(top1=f"{100 * correct1 / images:.2f}", top5=f"{100 * correct5 / images:.2f}",
                        res=x.shape[-1])
    if ctx is not None:
        from lowformer.train.distributed import all_reduce_sum
        correct1, correct5, loss_sum, images, skipped = all_reduce_sum(ctx, [correct1, correct5, loss_sum, images, skipped])
    n = max(images, 1)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n,
            "images": int(images), "skipped": int(skipped)}


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader: DataLoader, device: torch.device, ctx: DistContext | None = None,
                  amp_dtype: torch.dtype | None = None) -> int:
    """Replace every BatchNorm's running statistics by their average over ``loader`` (the original's
    BN reset before validation), with the rest of the model in eval mode (no dropout / drop path).
    Across ranks the mean is averaged and the variance taken around the global mean. Returns the
    number of batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
        bn.train()
    batches = 0
    for x, _, _ in loader:
        if len(x) > 1:
            with autocast_context(device, amp_dtype):
                model(x.to(device, non_blocking=True))
            batches += 1
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.train(was_training)
    if ctx is not None and ctx.distributed:
        import torch.distributed as dist
        for bn in bns:
            mean, var = bn.running_mean.clone(), bn.running_var.clone()
            global_mean = mean.clone()
            dist.all_reduce(global_mean)
            global_mean /= ctx.world_size
            spread = var + (mean - global_mean) ** 2
            dist.all_reduce(spread)
            bn.running_mean.copy_(global_mean)
            bn.running_var.copy_(spread / ctx.world_size)
    return batches


def imagenet_eval(
        model: nn.Module | str,
        data_dir: str | os.PathLike,
        image_size: int | None = None,
        crop_ratio: float | None = None,
        interpolation: str | None = None,
        class_map: str | os.PathLike | dict[str, int] | None = None,
        batch_size: int = 50,
        workers: int = 4,
        device: str | torch.device | None = None,
        progress: bool = True,
) -> dict[str, Any]:
    """Top-1 / top-5 of ``model`` (a module or a model name) on the class folders under ``data_dir``.

    Preprocessing comes from the model's ``pretrained_cfg`` (resize to ``size / crop_pct``, center crop,
    its interpolation and mean/std); ``image_size``, ``crop_ratio`` and ``interpolation`` override it.
    ``class_map`` (a ``classes.tsv`` path or a dict) gives each folder's index in the model's classes;
    without it, class i is the i-th folder in sorted order. Returns ``top1``, ``top5`` (percent), ``loss``,
    ``images``, ``skipped``, ``model``, ``image_size``, ``crop_ratio``, ``interpolation``."""
    from timm.data import resolve_model_data_config

    from lowformer.models import create_model
    if isinstance(model, str):
        model = create_model(model)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = dict(input_size=(3, image_size, image_size) if image_size else None, crop_pct=crop_ratio,
                     interpolation=interpolation)
    data_config = resolve_model_data_config(model)
    data_config.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(class_map, (str, os.PathLike)):
        class_map = read_class_map(class_map)
    dataset = ImageFolderDataset(data_dir, transform=eval_transform(model, **overrides), class_map=class_map)
    num_classes = getattr(model, "num_classes", None)
    if num_classes and max(dataset.class_to_idx.values()) >= num_classes:
        source = "the class map" if class_map else f"the {len(dataset.classes)} folders"
        raise LowformerError(f"{source} of '{data_dir}' name class indices up to "
                             f"{max(dataset.class_to_idx.values())}, but the model has {num_classes} classes")
    loader = build_eval_loader(dataset, batch_size, workers=workers, device=device)
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    model.to(device)
    result = evaluate(model, loader, device, progress=progress, desc=name)
    if result["skipped"]:
        _logger.warning("%d unreadable image(s) skipped", result["skipped"])
    return {"model": name, **result, "image_size": data_config["input_size"][-1],
            "crop_ratio": data_config["crop_pct"], "interpolation": data_config["interpolation"]}
