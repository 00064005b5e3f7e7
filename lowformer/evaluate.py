"""Top-1 / top-5 over an image folder (the original's ``fast_eval``), and BN statistics re-estimation.

``imagenet_eval(model, data_dir)`` evaluates with the model's own preprocessing from its
``pretrained_cfg`` (or overrides) and returns the metrics as a dict; with ``class_map`` a folder that
holds only some classes is scored in the full class index (e.g. ImageNet wnids -> 0..999).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lowformer.data import ImageFolderDataset, build_eval_loader, eval_transform, read_class_map
from lowformer.errors import LowformerError
from lowformer.files import atomic_output

if TYPE_CHECKING:
    from lowformer.train.distributed import DistContext

__all__ = ["evaluate", "reestimate_bn", "imagenet_eval", "eval_run", "autocast_context", "resolve_device",
           "check_result_path", "write_result"]

_logger = logging.getLogger(__name__)


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in ``dtype`` on ``device``, or nothing (fp32) when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, ctx: DistContext | None = None,
             amp_dtype: torch.dtype | None = None, progress: bool = False, desc: str = "eval") -> dict[str, Any]:
    """Cross-entropy, top-1 and top-5 (percent) of ``model`` over ``loader`` (batches from
    ``collate_skipping``), summed over ranks when ``ctx`` is distributed; unreadable images are counted
    in ``skipped``, not scored. ``forward_s`` is the time spent in the model (device synchronised),
    without data loading."""
    from tqdm import tqdm
    model.eval()
    correct1 = correct5 = loss_sum = forward_s = 0.0
    images = skipped = 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for x, y, n_skipped in bar:
        skipped += n_skipped
        if len(y) == 0:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _synchronize(device)
        start = time.perf_counter()
        with autocast_context(device, amp_dtype):
            out = model(x)
        out = out.float()
        _synchronize(device)
        forward_s += time.perf_counter() - start
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
            "images": int(images), "skipped": int(skipped), "forward_s": forward_s}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        amp: bool = False,
        checkpoint_path: str | os.PathLike | None = None,
        pretrained: bool = False,
        num_classes: int | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 of ``model`` (a module or a model name) on the class folders under ``data_dir``.

    Preprocessing comes from the model's ``pretrained_cfg`` (resize to ``size / crop_pct``, center crop,
    its interpolation and mean/std); ``image_size``, ``crop_ratio`` and ``interpolation`` override it.
    ``class_map`` (a ``classes.tsv`` path or a dict) gives each folder's index in the model's classes;
    without it, class i is the i-th folder in sorted order. A model name is built with ``create_model``
    and ``checkpoint_path``, ``pretrained``, ``num_classes``. ``amp`` runs the model under autocast
    (bfloat16 on the CPU, float16 on CUDA). Every argument is checked before any image is read, and an
    evaluation that scored no image fails.

    Returns ``top1``, ``top5`` (percent), ``loss``, ``images``, ``skipped``, ``model``, ``params``,
    ``image_size``, ``crop_ratio``, ``interpolation``, ``amp``, ``images_per_s`` and ``ms_per_image``
    (model time only, data loading excluded) and ``wall_s``."""
    from timm.data import resolve_model_data_config

    from lowformer.models import create_model
    _check_eval_args(image_size, crop_ratio, interpolation, batch_size, workers)
    if num_classes is not None and num_classes <= 0:
        raise LowformerError(f"num_classes must be a positive integer, got {num_classes}")
    device = resolve_device(device)
    if isinstance(model, str):
        kwargs = {"num_classes": num_classes} if num_classes is not None else {}
        model = create_model(model, pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)
    overrides = dict(input_size=(3, image_size, image_size) if image_size else None, crop_pct=crop_ratio,
                     interpolation=interpolation)
    data_config = resolve_model_data_config(model)
    data_config.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(class_map, (str, os.PathLike)):
        class_map = read_class_map(class_map)
    dataset = ImageFolderDataset(data_dir, transform=eval_transform(model, **overrides), class_map=class_map)
    if not dataset.samples:
        raise LowformerError(f"image folder '{data_dir}' holds no images in its class sub-folders")
    num_classes = getattr(model, "num_classes", None)
    if num_classes and max(dataset.class_to_idx.values()) >= num_classes:
        source = "the class map" if class_map else f"the {len(dataset.classes)} folders"
        raise LowformerError(f"{source} of '{data_dir}' name class indices up to "
                             f"{max(dataset.class_to_idx.values())}, but the model has {num_classes} classes")
    loader = build_eval_loader(dataset, batch_size, workers=workers, device=device)
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    model.to(device)
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if amp else None
    start = time.perf_counter()
    result = evaluate(model, loader, device, amp_dtype=amp_dtype, progress=progress, desc=name)
    wall_s = time.perf_counter() - start
    if result["images"] == 0:
        raise LowformerError(f"none of the {result['skipped']} image(s) under '{data_dir}' could be read, so "
                             "nothing was scored; check the files (JPEG/PNG) and the folder")
    if result["skipped"]:
        _logger.warning("%d unreadable image(s) skipped", result["skipped"])
    forward_s = max(result.pop("forward_s"), 1e-12)
    return {"model": name, **result, "params": sum(p.numel() for p in model.parameters()),
            "image_size": data_config["input_size"][-1], "crop_ratio": data_config["crop_pct"],
            "interpolation": data_config["interpolation"], "amp": str(amp_dtype).replace("torch.", "") if amp else None,
            "images_per_s": result["images"] / forward_s, "ms_per_image": 1000.0 * forward_s / result["images"],
            "wall_s": wall_s}


def eval_run(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
             checkpoint_path: str | os.PathLike | None = None, **kwargs: Any) -> dict[str, Any]:
    """:func:`imagenet_eval` of a training run's model (``lowformer.hub.load_run``: its best EMA weights,
    classes and validation preprocessing) on ``data_dir``, by default the run's own ``data_dir/val``.
    ``kwargs`` (``image_size``, ``batch_size``, ``amp``...) are passed on and override the recipe."""
    from lowformer.hub import load_run, read_run
    recipe = read_run(run_dir, data_dir)
    data = Path(data_dir) if data_dir is not None else recipe.data_dir / "val"
    _check_eval_args(kwargs.get("image_size"), kwargs.get("crop_ratio"), kwargs.get("interpolation"),
                     kwargs.get("batch_size", 50), kwargs.get("workers", 4))
    resolve_device(kwargs.get("device"))
    if not data.is_dir():
        raise LowformerError(f"run '{recipe.run_dir}' validates on '{data}', which does not exist; pass --data DIR")
    model = load_run(run_dir, checkpoint_path, data_dir)
    result = imagenet_eval(model, data, **kwargs)
    return {**result, "model": recipe.model, "run": str(recipe.run_dir),
            "checkpoint": str(checkpoint_path or recipe.weights)}


_RESULT_SUFFIXES = (".json", ".csv")


def check_result_path(path: str | os.PathLike) -> Path:
    """``path`` if results can be written there (a .json or .csv file in an existing, writable folder);
    checked before an evaluation starts so that its result is never lost."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in _RESULT_SUFFIXES:
        raise LowformerError(f"--out '{path}': name a .json or .csv file")
    if path.is_dir():
        raise LowformerError(f"--out '{path}' is a directory; name a .json or .csv file")
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise LowformerError(f"--out '{path}': the folder '{folder}' does not exist or is not writable")
    return path


def write_result(path: str | os.PathLike, result: dict[str, Any]) -> Path:
    """Write one evaluation result as JSON or as a one-row CSV, under a temporary name then renamed."""
    import csv
    import io
    import json
    path = check_result_path(path)
    if path.suffix.lower() == ".json":
        text = json.dumps(result, indent=1) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(result))
        writer.writeheader()
        writer.writerow(result)
        text = buffer.getvalue()
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _check_eval_args(image_size: int | None, crop_ratio: float | None, interpolation: str | None,
                     batch_size: int, workers: int) -> None:
    """Zero is a value, not "unset": only None means the model's default."""
    if image_size is not None and image_size <= 0:
        raise LowformerError(f"image size must be a positive number of pixels, got {image_size}")
    if crop_ratio is not None and not 0 < crop_ratio <= 1:
        raise LowformerError(f"crop ratio must be a fraction in (0, 1], got {crop_ratio}")
    if interpolation is not None and interpolation not in _INTERPOLATIONS:
        raise LowformerError(f"interpolation '{interpolation}' is not one of {', '.join(_INTERPOLATIONS)}")
    if batch_size <= 0:
        raise LowformerError(f"batch size must be a positive integer, got {batch_size}")
    if workers < 0:
        raise LowformerError(f"workers must be 0 (load in this process) or more, got {workers}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device (default: cuda when available), refused in one line when unusable."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise LowformerError(f"device '{device}' is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LowformerError(f"device '{device}': CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LowformerError(f"device '{device}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise LowformerError(f"device '{device}' is not supported here; use cpu, cuda or cuda:N")
    return device


@torch.inference_mode()
def predict(model: nn.Module | str | None, images: list[str | os.PathLike], topk: int = 5,
            device: str | torch.device | None = None, checkpoint_path: str | os.PathLike | None = None,
            pretrained: bool = False, run_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The ``topk`` classes of each image file, with the model's own preprocessing: per image ``image``
    and ``top``, a list of ``{"index", "name", "probability"}`` (names from ``lowformer.hub.class_names``).

    ``model`` is a module, a name for ``create_model`` (with ``checkpoint_path``, ``pretrained``), or None
    with ``run_dir``, a training run (``lowformer.hub.load_run``). Arguments are checked first."""
    from lowformer.data import load_image
    from lowformer.hub import class_names, load_run
    from lowformer.models import create_model
    if topk <= 0:
        raise LowformerError(f"topk must be a positive integer, got {topk}")
    if not images:
        raise LowformerError("no image given: name one or more image files")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise LowformerError(f"image file(s) not found: {', '.join(missing[:3])}")
    device = resolve_device(device if device is not None else "cpu")
    if run_dir is not None:
        model = load_run(run_dir, checkpoint_path)
    elif isinstance(model, str):
        model = create_model(model, pretrained=pretrained, checkpoint_path=checkpoint_path)
    elif model is None:
        raise LowformerError("name a model or a run directory")
    names = class_names(model)
    transform = eval_transform(model)
    model.eval().to(device)
    out = []
    for path in images:
        probs = model(transform(load_image(path)).unsqueeze(0).to(device)).float().softmax(-1)[0]
        top = probs.topk(min(topk, probs.numel()))
        out.append({"image": str(path), "top": [
            {"index": int(i), "name": names[i] if i < len(names) else f"class {i}", "probability": float(p)}
            for p, i in zip(top.values.tolist(), top.indices.tolist())]})
    return out
