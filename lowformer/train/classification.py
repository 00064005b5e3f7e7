"""Image classification as a :class:`~lowformer.train.task.Task`: LowFormer's ImageNet recipe.

ImageNet-layout folders (``data_dir/train/<class>/*``, ``data_dir/val/<class>/*``), one training
resolution per batch from ``data_provider.image_size``, timm's Mixup/CutMix or label smoothing, BCE or
soft-target cross-entropy, MESA (the EMA model as teacher after ``mesa.thresh`` of the progress), and
before each validation the EMA model's BN statistics re-estimated on a seeded subset of training images.
``evalmodel.pt`` is the EMA in the original repository's key layout, as the original publishes it.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from lowformer.checkpoints import extract_state_dict, read_checkpoint, to_original_layout
from lowformer.data.datasets import ImageFolderDataset, build_eval_loader, build_train_loader
from lowformer.data.transforms import train_transform, val_transform
from lowformer.errors import LowformerError
from lowformer.evaluate import evaluate, reestimate_bn
from lowformer.train.config import TrainConfig
from lowformer.train.distributed import DistContext
from lowformer.train.setup import build_criterion, build_mixup, build_model
from lowformer.train.task import EvalInfo, LossOutput, StepInfo, Task, register_task

__all__ = ["ClassificationTask"]

_logger = logging.getLogger(__name__)


class ClassificationTask(Task):
    name = "classification"
    datasets = ("imagenet", "cifar10")  # both in class-folder layout
    metric = "top1"
    higher_is_better = True
    metric_names = ("loss", "top1", "top5")

    def __init__(self, cfg: TrainConfig, ctx: DistContext, seed: int) -> None:
        super().__init__(cfg, ctx, seed)
        data_dir = Path(cfg.data_provider.data_dir).expanduser()
        self.train_set = ImageFolderDataset(data_dir / "train")
        self.val_set = None if cfg.run_config.no_eval else ImageFolderDataset(data_dir / "val")
        if self.val_set is not None and self.val_set.class_to_idx != self.train_set.class_to_idx:
            raise LowformerError(f"'{data_dir}/val' and '{data_dir}/train' hold different class folders")
        self.num_classes = len(self.train_set.classes)
        self.criterion = build_criterion(cfg)
        self.mixup = build_mixup(cfg, self.num_classes)

    def describe(self) -> str:
        return f"{self.num_classes} classes, {len(self.train_set)} train images"

    def build_model(self) -> nn.Module:
        return build_model(self.cfg, self.num_classes)

    def _train_transform(self, size: int) -> Any:
        dp = self.cfg.data_provider
        randaug = next((a for a in dp.data_aug if a.name == "randaug"), None)
        erase = next((a for a in dp.data_aug if a.name == "erase"), None)
        return train_transform(size, scale=dp.rrc_config.scale, hflip=dp.hflip,
                               randaug=(randaug.n, randaug.m) if randaug is not None else None,
                               erase_p=erase.p if erase is not None else 0.0,
                               interpolation=dp.rrc_config.train_interpolate)

    def build_train_loader(self) -> DataLoader:
        dp = self.cfg.data_provider
        return build_train_loader(
            self.train_set, [self._train_transform(s) for s in dp.image_size], dp.base_batch_size,
            rank=self.ctx.rank, world_size=self.ctx.world_size, seed=self.seed, workers=dp.n_worker,
            device=self.ctx.device, drop_last=dp.drop_last)

    def loss(self, model: nn.Module, batch: Any, info: StepInfo) -> LossOutput:
        from timm.data.mixup import mixup_target
        x, y, skipped = batch
        rc = self.cfg.run_config
        if self.mixup is not None and len(y) % 2:
            x, y = x[:-1], y[:-1]  # mixing pairs samples; a dropped unreadable image can leave an odd batch
        if len(y) == 0:
            raise LowformerError(f"epoch {info.epoch + 1}, batch {info.batch}: every image of the batch was unreadable")
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        else:
            target = mixup_target(y, self.num_classes, smoothing=rc.label_smooth)
        out = model(x)
        loss = self.criterion(out, target)
        if rc.mesa is not None and info.progress >= rc.mesa.thresh and info.ema_model is not None:
            with torch.no_grad():
                teacher = info.ema_model(x).float().sigmoid()
            loss = loss + rc.mesa.ratio * self.criterion(out, teacher)
        return LossOutput(loss, len(y), int(skipped), {"res": x.shape[-1]})

    def validate(self, model: nn.Module, info: EvalInfo) -> dict[str, float] | None:
        if self.val_set is None:
            return None
        rc, dp = self.cfg.run_config, self.cfg.data_provider
        results = []
        for size in rc.eval_image_size:
            if rc.reset_bn:
                self._reset_bn(model, size, info)
            self.val_set.transform = val_transform(size, crop_ratio=dp.rrc_config.test_crop_ratio,
                                                   interpolation=dp.rrc_config.test_interpolate)
            loader = build_eval_loader(self.val_set, dp.test_batch_size or 2 * dp.base_batch_size, rank=self.ctx.rank,
                                       world_size=self.ctx.world_size, workers=dp.n_worker, device=info.device)
            results.append(evaluate(model, loader, info.device, self.ctx, info.amp_dtype, progress=info.progress,
                                    desc=f"val {size}px"))
        return {key: sum(r[key] for r in results) / len(results) for key in self.metric_names}

    def _reset_bn(self, model: nn.Module, size: int, info: EvalInfo) -> None:
        """BN statistics of the EMA model from a seeded subset of training images at ``size``."""
        rc, dp = self.cfg.run_config, self.cfg.data_provider
        g = torch.Generator().manual_seed(self.seed)
        subset = torch.randperm(len(self.train_set), generator=g)[:rc.reset_bn_size].tolist()
        subset_set = copy.copy(self.train_set)
        subset_set.transform = self._train_transform(size)
        loader = build_eval_loader(subset_set, rc.reset_bn_batch_size, rank=self.ctx.rank,
                                   world_size=self.ctx.world_size, workers=dp.n_worker, device=info.device,
                                   indices=subset)
        reestimate_bn(model, loader, info.device, self.ctx, info.amp_dtype)

    def eval_weights(self, ema_model: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
        """EMA weights as the original publishes them: a bare state dict in the original key layout."""
        return to_original_layout(ema_model.state_dict(), model)

    def load_initial(self, model: nn.Module, path: Path) -> str:
        """Weights from any checkpoint layout ``lowformer.load_checkpoint`` reads; a classifier of
        another class count is left freshly initialised."""
        from lowformer.checkpoints import _checkpoint_filter, load_checkpoint
        state = extract_state_dict(read_checkpoint(path), path)
        filter_fn = _checkpoint_filter(model)
        if filter_fn is not None:
            state = filter_fn(state, model)
        own = model.state_dict()
        head = [k for k in state if k in own and state[k].shape != own[k].shape]
        if not head:
            load_checkpoint(model, path, strict=True)
            return f"initial weights: {path} (all {len(own)} tensors)"
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        head_ids = {id(p) for p in classifier.parameters()} if isinstance(classifier, nn.Module) else set()
        head_names = {n for n, p in model.named_parameters() if id(p) in head_ids}
        outside = [k for k in head if k not in head_names]
        if outside:
            raise LowformerError(f"--initial-checkpoint '{path}': {len(outside)} tensors outside the classifier differ "
                                 f"in shape (e.g. {outside[0]} {tuple(state[outside[0]].shape)} vs "
                                 f"{tuple(own[outside[0]].shape)}); is it a checkpoint of another model?")
        old = state[head[0]].shape[0]
        loadable = {k: v for k, v in state.items() if k not in head}
        missing = [k for k in own if k not in loadable and own[k].is_floating_point() and k not in head_names]
        if missing:
            raise LowformerError(f"--initial-checkpoint '{path}': {len(missing)} tensors of the model are missing "
                                 f"(e.g. {missing[0]}); is it a checkpoint of another model?")
        model.load_state_dict(loadable, strict=False)
        return (f"initial weights: {path}; classifier re-initialised for {self.num_classes} classes "
                f"(the checkpoint has {old})")

    def preview(self, batch: Any) -> torch.Tensor | None:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        x = batch[0][:16].float()
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
        return (x * std + mean).clamp(0, 1)


register_task(ClassificationTask.name, ClassificationTask)
