"""Detection as a task of the one trainer (:mod:`lowformer.train`): what the loop needs from it.

A config selects it with ``task: detection`` and sets it in a ``detection:`` section; the backbone is
``net_config.name`` (its model arguments ``net_config.kwargs``), the data folder
``data_provider.data_dir`` (composite or COCO layout), the batch ``data_provider.base_batch_size``.
Everything else (optimizer, warm-up and cosine schedule, EMA, AMP, DDP, exact resume, NaN stop,
metrics.csv / TensorBoard) is the trainer's. The best epoch is the one with the highest bbox mAP.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lowformer.detection.data import (
    CocoDetectionData,
    collate,
    eval_transforms,
    find_split,
    train_transforms,
)
from lowformer.detection.metrics import evaluate_detector
from lowformer.detection.models import ARCHS, Detector, DetectorError, create_detector
from lowformer.train.config import ConfigError, TrainConfig, register_section
from lowformer.train.distributed import DistContext
from lowformer.train.task import EvalInfo, LossOutput, StepInfo, Task, register_task

__all__ = ["DetectionSection", "DetectionTask", "detector_from_config"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectionSection:
    """The ``detection:`` keys of a recipe."""
    arch: str = "retinanet"
    preset: str | None = None  # default: <arch>_<backbone> where such a preset exists
    backbone_checkpoint: str | None = None  # a classifier's checkpoint for the backbone (any layout)
    frozen_stages: int = -1
    freeze_bn: bool = False
    train_split: str = "train"
    val_split: str = "val"
    train_min_size: int = 480  # random resize of the training images: shorter side (or side, square) range
    train_max_size: int = 800
    square: bool = False
    crop: int | None = None
    flip: float = 0.5
    val_images: int | None = None  # validate on the first N images only (fast per-epoch checks)
    eval_batch_size: int = 8
    settings: dict = field(default_factory=dict)  # DetectorConfig fields (sizes, FPN, anchors, heads)


register_section("detection", DetectionSection)


def detector_from_config(cfg: TrainConfig, num_classes: int, with_backbone_weights: bool = True) -> Detector:
    """The detector a recipe describes (``with_backbone_weights=False`` when trained weights follow)."""
    sec: DetectionSection = cfg.section("detection")
    if sec.arch not in ARCHS:
        raise ConfigError(f"config key 'detection.arch': unknown detector '{sec.arch}' (choose {', '.join(ARCHS)})")
    ckpt = sec.backbone_checkpoint if with_backbone_weights else None
    if ckpt is not None and not Path(ckpt).expanduser().is_file():
        raise ConfigError(f"config key 'detection.backbone_checkpoint': file '{ckpt}' not found")
    backbone_kwargs = dict(cfg.net_config.kwargs)
    if cfg.backbone_drop.drop_prob:
        backbone_kwargs["drop_path_rate"] = cfg.backbone_drop.drop_prob
    settings = dict(sec.settings)
    if backbone_kwargs:
        settings["backbone_kwargs"] = {**settings.get("backbone_kwargs", {}), **backbone_kwargs}
    try:
        return create_detector(sec.arch, cfg.net_config.name, num_classes, preset=sec.preset,
                               checkpoint_path=ckpt, frozen_stages=sec.frozen_stages, freeze_bn=sec.freeze_bn,
                               **settings)
    except DetectorError as e:
        raise ConfigError(f"config section 'detection': {e}") from None


class DetectionTask(Task):
    name = "detection"
    datasets = ("coco", "composite")  # both in COCO layout
    metric = "bbox_map"
    higher_is_better = True
    metric_names = ("bbox_map", "bbox_map_50", "bbox_map_75")

    def __init__(self, cfg: TrainConfig, ctx: DistContext, seed: int) -> None:
        super().__init__(cfg, ctx, seed)
        self.sec: DetectionSection = cfg.section("detection")
        masks = self.sec.arch == "mask_rcnn"
        if masks:
            self.metric_names = (*self.metric_names, "segm_map", "segm_map_50")
        data_dir = cfg.data_provider.data_dir
        images, ann = find_split(data_dir, self.sec.train_split)
        tf = train_transforms(self.sec.train_min_size, self.sec.train_max_size, self.sec.crop, self.sec.flip,
                              self.sec.square)
        self.train_set = CocoDetectionData(images, ann, tf, masks=masks, skip_empty=True)
        self.val_set = None
        if not cfg.run_config.no_eval:
            images, ann = find_split(data_dir, self.sec.val_split)
            self.val_set = CocoDetectionData(images, ann, eval_transforms(), masks=masks)
            if self.val_set.cat_ids != self.train_set.cat_ids:
                raise ConfigError(f"'{data_dir}': the {self.sec.train_split} and {self.sec.val_split} annotation files "
                                  "list different categories")
        self.num_classes = len(self.train_set.cat_ids)

    def describe(self) -> str:
        skipped = ", ".join(f"{n} x {k}" for k, n in self.train_set.skipped.items())
        return (f"{self.sec.arch} on {self.cfg.net_config.name}, {self.num_classes} classes, "
                f"{len(self.train_set)} train images" + (f" (skipped: {skipped})" if skipped else ""))

    def build_model(self) -> nn.Module:
        return detector_from_config(self.cfg, self.num_classes)

    def build_train_loader(self) -> DataLoader:
        dp = self.cfg.data_provider
        sampler = DistributedSampler(self.train_set, num_replicas=self.ctx.world_size, rank=self.ctx.rank,
                                     shuffle=True, seed=self.seed, drop_last=True)
        return DataLoader(self.train_set, batch_size=dp.base_batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=dp.n_worker, drop_last=dp.drop_last, persistent_workers=dp.n_worker > 0)

    def loss(self, model: nn.Module, batch: Any, info: StepInfo) -> LossOutput:
        images, targets = batch
        images = [im.to(info.device, non_blocking=True) for im in images]
        targets = [{k: (v.to(info.device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
                   for t in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        return LossOutput(loss, len(images), 0, {k: float(v.detach()) for k, v in losses.items()})

    def validate(self, model: nn.Module, info: EvalInfo) -> dict[str, float] | None:
        if self.val_set is None:
            return None
        n = len(self.val_set) if self.sec.val_images is None else min(self.sec.val_images, len(self.val_set))
        indices = list(range(n))[self.ctx.rank::self.ctx.world_size]
        metrics, _ = evaluate_detector(model, self.val_set, self.sec.eval_batch_size, info.device,
                                       indices=indices, world_size=self.ctx.world_size)
        return {k: float(metrics[k]) for k in self.metric_names}

    def eval_weights(self, ema_model: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
        return ema_model.state_dict()

    def load_initial(self, model: nn.Module, path: Path) -> str:
        """A detector checkpoint (``evalmodel.pt`` of another detection run) as the starting weights."""
        from lowformer.checkpoints import load_checkpoint
        load_checkpoint(model, path, strict=True)
        return f"initial weights: {path}"


register_task("detection", DetectionTask)
