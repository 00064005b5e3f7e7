"""Semantic segmentation as a task of the shared trainer (:mod:`lowformer.train.task`).

Config: the shared groups (``data_provider.data_dir``/``base_batch_size``/``n_worker``, ``run_config``
optimizer and schedule, ``net_config.name`` = the backbone, ``backbone_drop``, ``ema_decay``) plus a
``segmentation:`` section (:class:`SegmentationConfig`). The loss is cross-entropy ignoring the ignore
index (optionally class-weighted), plus ``dice_weight`` x Dice, plus UperNet's auxiliary FCN loss.
Validation scores the EMA model with mIoU over the val split, at ``test_scale``, whole-image or sliding.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lowformer.errors import import_optional
from lowformer.segmentation.data import (
    IGNORE_INDEX,
    MEAN,
    STD,
    PasteObjects,
    SegmentationFolder,
    collate_seg,
    eval_transform,
    train_transform,
)
from lowformer.segmentation.inference import infer
from lowformer.segmentation.metrics import ConfusionMatrix
from lowformer.segmentation.models import (
    ARCHS,
    Segmenter,
    create_segmenter,
    load_encoder_checkpoint,
)
from lowformer.train.config import ConfigError, TrainConfig, register_section
from lowformer.train.distributed import DistContext
from lowformer.train.task import EvalInfo, LossOutput, StepInfo, Task, register_task

__all__ = ["SegmentationConfig", "SegmentationTask", "build_segmenter", "evaluate_segmenter"]

_logger = logging.getLogger(__name__)

CLASS_WEIGHTS = ("none", "inverse_sqrt")
_LAYOUTS = {"ade20k": "ade20k", "voc": "voc", "composite": "ade20k"}  # data_provider.dataset -> folder layout


@dataclass(frozen=True)
class SegmentationConfig:
    """The ``segmentation:`` section. Sizes are (height, width); ``scale`` is mmseg's image scale
    ((2048, 512) there is (512, 2048) here), multiplied by a ratio from ``ratio_range`` in training."""
    arch: str = "semantic_fpn"
    num_classes: int = 150
    class_names: tuple[str, ...] = ()
    train_split: str = "train"
    val_split: str = "val"
    reduce_zero_label: bool = False
    scale: tuple[int, int] = (512, 2048)
    crop: tuple[int, int] = (512, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    photometric: bool = True
    test_scale: tuple[int, int] = (512, 2048)
    test_mode: str = "whole"
    test_crop: tuple[int, int] = (512, 512)
    test_stride: tuple[int, int] = (341, 341)
    test_flip: bool = False  # also score the mirror image and average the logits (mmseg's flip test)
    output_stride: int | None = None
    backbone_checkpoint: str | None = None
    class_weight: str = "none"
    dice_weight: float = 0.0
    # Copy-paste: photos of a classification folder (<class name>/<image>, names from class_names) pasted
    # onto the training images before any resizing (PasteObjects); sizes in pixels of the images as read.
    paste_source: str | None = None
    paste_count: tuple[int, int] = (0, 3)
    paste_size: tuple[int, int] = (40, 112)
    paste_aspect: tuple[float, float] = (0.7, 1.4)
    paste_shape: str = "ellipse"
    paste_free_label: int | None = 0


register_section("segmentation", SegmentationConfig)


def _check(sc: SegmentationConfig) -> None:
    if sc.arch not in ARCHS:
        raise ConfigError(f"config key 'segmentation.arch': '{sc.arch}' is not one of {', '.join(ARCHS)}")
    if sc.num_classes < 1:
        raise ConfigError("config key 'segmentation.num_classes': must be at least 1")
    if sc.class_names and len(sc.class_names) != sc.num_classes:
        raise ConfigError(f"config key 'segmentation.class_names': {len(sc.class_names)} names for "
                          f"{sc.num_classes} classes")
    if sc.class_weight not in CLASS_WEIGHTS:
        raise ConfigError(f"config key 'segmentation.class_weight': use one of {', '.join(CLASS_WEIGHTS)}")
    if sc.test_mode not in ("whole", "slide"):
        raise ConfigError("config key 'segmentation.test_mode': use whole or slide")
    if sc.dice_weight < 0:
        raise ConfigError("config key 'segmentation.dice_weight': must be >= 0")
    if sc.paste_source is not None and not sc.class_names:
        raise ConfigError("config key 'segmentation.paste_source': set segmentation.class_names too, to match "
                          "the source's class folders to the classes")


def build_segmenter(cfg: TrainConfig, with_checkpoint: bool = True) -> Segmenter:
    """The segmenter a config describes (the backbone's classification checkpoint loaded if set)."""
    sc = cfg.section("segmentation")
    _check(sc)
    kwargs: dict[str, Any] = dict(cfg.net_config.kwargs)
    if cfg.backbone_drop.drop_prob > 0:
        kwargs["drop_path_rate"] = cfg.backbone_drop.drop_prob
    return create_segmenter(sc.arch, cfg.net_config.name, sc.num_classes, output_stride=sc.output_stride,
                            checkpoint_path=sc.backbone_checkpoint if with_checkpoint else None, **kwargs)


def _class_pixel_counts(dataset: SegmentationFolder) -> np.ndarray:
    counts = np.zeros(dataset.num_classes, np.int64)
    for i in range(len(dataset)):
        mask = dataset.load(i)[1].numpy()
        counts += np.bincount(mask[mask != dataset.ignore_index].ravel(), minlength=dataset.num_classes)[
            :dataset.num_classes]
    return counts


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, dataset: SegmentationFolder, sc: SegmentationConfig, device: torch.device,
                       ctx: DistContext | None = None, amp_dtype: torch.dtype | None = None,
                       progress: bool = False) -> dict:
    """Scores (mIoU, pixel accuracy, per-class IoU, all percent) of ``model`` on ``dataset`` (its transform
    must be ``eval_transform``), every image at its original resolution; ranks share the images."""
    from tqdm import tqdm

    from lowformer.evaluate import autocast_context
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(sc.num_classes, IGNORE_INDEX)
    indices = range(rank, len(dataset), world)
    for i in tqdm(indices, desc="val", disable=not progress, leave=False, dynamic_ncols=True):
        image, mask = dataset[i]
        with autocast_context(device, amp_dtype):
            logits = infer(model, image[None].to(device), size=mask.shape[-2:], mode=sc.test_mode,
                           crop=sc.test_crop, stride=sc.test_stride, flip=sc.test_flip)
        cm.update(logits.float().argmax(1)[0], mask)
    model.train(was_training)
    if ctx is not None and ctx.distributed:
        matrix = cm.matrix.to(device)
        torch.distributed.all_reduce(matrix)
        cm.matrix = matrix.cpu()
    scores = cm.scores(list(sc.class_names) or None)
    scores["images"] = len(dataset)
    return scores


class SegmentationTask(Task):
    name = "segmentation"
    datasets = tuple(_LAYOUTS)
    metric = "miou"
    higher_is_better = True
    metric_names = ("miou", "pixel_acc")

    def __init__(self, cfg: TrainConfig, ctx: DistContext, seed: int) -> None:
        super().__init__(cfg, ctx, seed)
        self.sc = sc = cfg.section("segmentation")
        _check(sc)
        data_dir = Path(cfg.data_provider.data_dir).expanduser()
        self.paste = None if sc.paste_source is None else PasteObjects(
            sc.paste_source, sc.class_names, sc.paste_count, sc.paste_size, sc.paste_aspect, sc.paste_shape,
            sc.paste_free_label)
        self.train_set = SegmentationFolder(
            data_dir, sc.train_split, sc.num_classes,
            train_transform(sc.scale, sc.crop, sc.ratio_range, cfg.data_provider.hflip, sc.photometric, self.paste),
            reduce_zero_label=sc.reduce_zero_label)
        layout = _LAYOUTS.get(cfg.data_provider.dataset)
        if layout is not None and self.train_set.layout != layout:
            raise ConfigError(f"config key 'data_provider.dataset': {cfg.data_provider.dataset} comes in {layout} "
                              f"layout, but '{data_dir}' is in {self.train_set.layout} layout: fix data_dir or dataset")
        self.val_set = None if cfg.run_config.no_eval else SegmentationFolder(
            data_dir, sc.val_split, sc.num_classes, eval_transform(sc.test_scale), reduce_zero_label=sc.reduce_zero_label)
        self.class_weight = None
        if sc.class_weight == "inverse_sqrt":
            freq = _class_pixel_counts(self.train_set).astype(np.float64)
            w = 1.0 / np.sqrt(np.maximum(freq, 1.0) / freq.sum())
            self.class_weight = torch.tensor(w / w.mean(), dtype=torch.float32)
        self.dice = None
        if sc.dice_weight > 0:
            losses = import_optional("segmentation_models_pytorch.losses", "segmentation", "the Dice loss")
            self.dice = losses.DiceLoss("multiclass", ignore_index=IGNORE_INDEX)

    def describe(self) -> str:
        val = f", {len(self.val_set)} val" if self.val_set is not None else ""
        paste = "" if self.paste is None else (f"; pasting {self.sc.paste_count[0]}-{self.sc.paste_count[1]} of the "
                                               f"{len(self.paste.objects)} photos in {self.sc.paste_source} per image")
        return (f"{self.sc.arch} on {self.cfg.net_config.name}, {self.sc.num_classes} classes, "
                f"{len(self.train_set)} train images{val} ({self.train_set.unlabelled} without label map skipped)"
                f"{paste}")

    def build_model(self) -> nn.Module:
        return build_segmenter(self.cfg)

    def build_train_loader(self) -> DataLoader:
        dp = self.cfg.data_provider
        sampler = DistributedSampler(self.train_set, num_replicas=self.ctx.world_size, rank=self.ctx.rank,
                                     shuffle=True, seed=self.seed, drop_last=dp.drop_last)
        return DataLoader(self.train_set, batch_size=dp.base_batch_size, sampler=sampler, num_workers=dp.n_worker,
                          collate_fn=collate_seg, drop_last=dp.drop_last, pin_memory=self.ctx.device.type == "cuda",
                          persistent_workers=False)

    def _criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.class_weight.to(logits.device) if self.class_weight is not None else None
        loss = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=IGNORE_INDEX)
        if self.dice is not None:
            loss = loss + self.sc.dice_weight * self.dice(logits.float(), target)
        return loss

    def loss(self, model: nn.Module, batch: Any, info: StepInfo) -> LossOutput:
        x, y = batch
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        out = model(x)
        if isinstance(out, dict):
            main = self._criterion(out["out"], y)
            aux_weight = getattr(model, "module", model).aux_weight
            loss = main + aux_weight * self._criterion(out["aux"], y)
            return LossOutput(loss, len(y), 0, {"main": float(main)})
        return LossOutput(self._criterion(out, y), len(y), 0)

    def validate(self, model: nn.Module, info: EvalInfo) -> dict[str, float] | None:
        if self.val_set is None:
            return None
        scores = evaluate_segmenter(model, self.val_set, self.sc, info.device, self.ctx, info.amp_dtype, info.progress)
        return {k: scores[k] for k in self.metric_names}

    def load_initial(self, model: nn.Module, path: Path) -> str:
        """A whole segmenter's weights, or a classification checkpoint of the backbone into the encoder."""
        from lowformer.checkpoints import extract_state_dict, read_checkpoint
        state = extract_state_dict(read_checkpoint(path), path)
        if any(k.startswith("net.encoder.") for k in state):
            model.load_state_dict(state)
            return f"initial weights: {path} (whole segmenter)"
        load_encoder_checkpoint(model.net.encoder, self.cfg.net_config.name, path)
        return f"initial weights: {path} into the {self.cfg.net_config.name} encoder; decoder freshly initialised"

    def preview(self, batch: Any) -> torch.Tensor | None:
        x = batch[0][:16].float()
        return (x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).clamp(0, 1)


register_task(SegmentationTask.name, SegmentationTask)
