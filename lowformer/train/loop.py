"""The epoch loop: LowFormer's recipe on timm's parts, resumable, one process or many (torchrun).

Per micro-batch: the learning rate and the drop-path rates are set from the global step (so a resumed
run continues the same curves), the batch is mixed or label-smoothed, forward/backward runs (DDP
gradient all-reduce only on the last micro-batch of a ``bsizemult`` group; micro-batch gradients are
summed, as in the original), and on the group's last micro-batch gradients are clipped by value and the
optimizer and EMA step. After each epoch the EMA model's BN statistics are re-estimated on a seeded
subset of training images and it is validated; then a checkpoint is written atomically.

Run directory: ``config.yaml``, ``model_arch.txt``, ``metrics.csv``, ``summary.json`` and
``checkpoint/`` with ``checkpoint.pt`` (full state, every epoch), ``model_best.pt`` (full state of the
best epoch), ``evalmodel.pt`` (EMA weights of the best epoch, a bare state dict in the original key
layout, as the original publishes them), ``evalmodel_final.pt`` (the same at the end) and ``latest.txt``.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from timm.utils import random_seed

from lowformer.checkpoints import to_original_layout
from lowformer.data.datasets import ImageFolderDataset, build_eval_loader, build_train_loader
from lowformer.data.transforms import train_transform, val_transform
from lowformer.errors import LowformerError
from lowformer.evaluate import autocast_context, evaluate, reestimate_bn
from lowformer.train.config import (
    TrainConfig,
    config_to_dict,
    global_batch_size,
    peak_lr,
    total_epochs,
    warmup_and_total_steps,
)
from lowformer.train.distributed import DistContext, all_reduce_sum, broadcast_max_diff, init_distributed
from lowformer.train.setup import (
    DropPathSchedule,
    LowformerEma,
    build_criterion,
    build_mixup,
    build_model,
    build_optimizer,
    build_scheduler,
)

__all__ = ["train", "TrainingDiverged", "AMP_MODES"]

_logger = logging.getLogger(__name__)

AMP_MODES = ("none", "bf16", "fp16")
_METRICS = ["epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "best_top1", "skipped_images",
            "images_per_s", "epoch_s", "rank_param_max_diff"]


class TrainingDiverged(LowformerError, RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, Any]:
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


class _Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, ctx: DistContext, *, resume: bool, seed: int, amp: str,
                 stop_after_epochs: int | None, progress: bool) -> None:
        self.cfg, self.run_dir, self.ctx = cfg, run_dir, ctx
        self.ckpt_dir = run_dir / "checkpoint"
        self.resume, self.seed, self.stop_after = resume, seed, stop_after_epochs
        self.progress = progress and ctx.is_main
        self.log = _logger.info if ctx.is_main else (lambda *args: None)
        self.device = ctx.device
        self.amp_dtype, self.scaler = _amp(amp, self.device)
        dp, rc = cfg.data_provider, cfg.run_config

        data_dir = Path(dp.data_dir).expanduser()
        self.train_set = ImageFolderDataset(data_dir / "train")
        self.val_set = None if rc.no_eval else ImageFolderDataset(data_dir / "val")
        if self.val_set is not None and self.val_set.class_to_idx != self.train_set.class_to_idx:
            raise LowformerError(f"'{data_dir}/val' and '{data_dir}/train' hold different class folders")
        self.num_classes = len(self.train_set.classes)

        # Same initial weights on every rank and for any world size; then per-rank randomness.
        torch.manual_seed(seed)
        self.model = build_model(cfg, self.num_classes).to(self.device)
        random_seed(seed + ctx.rank)
        self.drop_path = DropPathSchedule(self.model, cfg.backbone_drop.drop_prob, cfg.backbone_drop.linear_decay,
                                          cfg.backbone_drop.skip)
        self.ema = LowformerEma(self.model, decay=cfg.ema_decay)
        self.ddp = self.model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel
            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        self.loader = build_train_loader(
            self.train_set, [train_transform(dp, s) for s in dp.image_size], dp.base_batch_size, rank=ctx.rank,
            world_size=ctx.world_size, seed=seed, workers=dp.n_worker, device=self.device, drop_last=dp.drop_last)
        self.batches_per_epoch = len(self.loader)
        self.peak_lr = peak_lr(cfg, ctx.world_size)
        self.optimizer = build_optimizer(self.model, cfg, self.peak_lr)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.batches_per_epoch)
        self.warmup_steps, self.cosine_steps = warmup_and_total_steps(cfg, self.batches_per_epoch)
        self.criterion = build_criterion(cfg)
        self.mixup = build_mixup(cfg, self.num_classes)
        self.epochs = total_epochs(cfg)
        self.start_epoch, self.best_top1 = 0, None
        self.stats = {"train_images": 0.0, "train_s": 0.0, "wall_s": 0.0, "skipped_images": 0}
        self.last_top1: float | None = None
        self._epochs_done = 0

    # --- set-up of the run directory -------------------------------------------------------------------
    def prepare_run_dir(self) -> None:
        latest = self.ckpt_dir / "latest.txt"
        if self.ctx.is_main:
            if not self.resume and latest.exists():
                raise LowformerError(f"run directory '{self.run_dir}' already holds a run; add --resume to continue "
                                     "it or choose another --path")
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
            (self.run_dir / "model_arch.txt").write_text(str(self.model) + "\n")
        self.ctx.barrier()
        if self.resume:
            self._load(latest)
        self.log("%s: %d classes, %d train images, %d processes x %d images x bsizemult %d = global batch %d, "
                     "peak lr %.4g (base_lr x bsizemult x world size), %d epochs (%d warm-up), %d batches/epoch",
                     self.cfg.net_config.name, self.num_classes, len(self.train_set), self.ctx.world_size,
                     self.cfg.data_provider.base_batch_size, self.cfg.run_config.bsizemult,
                     global_batch_size(self.cfg, self.ctx.world_size), self.peak_lr, self.epochs,
                     self.cfg.run_config.warmup_epochs, self.batches_per_epoch)

    def _load(self, latest: Path) -> None:
        from lowformer.checkpoints import read_checkpoint
        if not latest.is_file():
            raise LowformerError(f"--resume: no checkpoint in '{self.ckpt_dir}' (latest.txt missing); "
                                 "start without --resume")
        path = self.ckpt_dir / latest.read_text().strip()
        state = read_checkpoint(path)
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        ema = state["ema"].get(self.cfg.ema_decay)
        if ema is None:
            raise LowformerError(f"--resume: '{path}' holds EMA weights for decay {list(state['ema'])}, the config "
                                 f"says ema_decay {self.cfg.ema_decay}")
        self.ema.module.load_state_dict(ema)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = state["epoch"] + 1
        self.best_top1 = state["best_val"]
        self.last_top1 = state.get("last_val")
        self.stats = dict(state["stats"])
        rng = state.get("rng") or []
        if len(rng) == self.ctx.world_size:
            _set_rng_state(rng[self.ctx.rank])
        else:
            _logger.warning("--resume with %d processes, the checkpoint was written by %d: random streams restart",
                            self.ctx.world_size, len(rng))
        self.log("resumed from %s (epoch %d done)", path, self.start_epoch)

    # --- one epoch -------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        from timm.data.mixup import mixup_target
        from timm.utils import dispatch_clip_grad
        from tqdm import tqdm
        rc = self.cfg.run_config
        k = rc.bsizemult
        self.loader.batch_sampler.set_epoch(epoch)
        self.ddp.train()
        loss_sum = loss_count = 0.0
        images = skipped = 0
        start = time.perf_counter()
        bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{self.epochs}", disable=not self.progress,
                   dynamic_ncols=True, leave=False)
        for i, (x, y, n_skipped) in enumerate(bar):
            skipped += n_skipped
            step = epoch * self.batches_per_epoch + i
            self.scheduler.step_update(step)
            progress = max(0, step - self.warmup_steps) / self.cosine_steps
            self.drop_path.set_progress(progress)
            need_update = (i + 1) % k == 0 or i + 1 == self.batches_per_epoch
            if i % k == 0:
                self.optimizer.zero_grad(set_to_none=True)
            if self.mixup is not None and len(y) % 2:
                x, y = x[:-1], y[:-1]  # mixing pairs samples; a dropped unreadable image can leave an odd batch
            if len(y) == 0:
                raise LowformerError(f"epoch {epoch + 1}, batch {i}: every image of the batch was unreadable")
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.mixup is not None:
                x, target = self.mixup(x, y)
            else:
                target = mixup_target(y, self.num_classes, smoothing=rc.label_smooth)
            sync = contextlib.nullcontext() if need_update or self.ddp is self.model else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    out = self.ddp(x)
                    loss = self.criterion(out, target)
                    if rc.mesa is not None and progress >= rc.mesa.thresh:
                        with torch.no_grad():
                            teacher = self.ema.module(x).float().sigmoid()
                        loss = loss + rc.mesa.ratio * self.criterion(out, teacher)
                self._check_finite(loss, epoch, i)
                params = self.model.parameters()
                if self.scaler is not None:
                    self.scaler(loss, self.optimizer, clip_grad=rc.grad_clip, clip_mode="value", parameters=params,
                                need_update=need_update)
                else:
                    loss.backward()
                    if need_update:
                        if rc.grad_clip is not None:
                            dispatch_clip_grad(params, rc.grad_clip, mode="value")
                        self.optimizer.step()
            if need_update:
                self.ema.update(self.model, step=step + 1)
            loss_sum += loss.item() * len(y)
            loss_count += len(y)
            images += len(y)
            if self.progress:
                bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.3g}",
                                res=x.shape[-1], bs=len(y))
        seconds = time.perf_counter() - start
        loss_sum, loss_count, images, skipped = all_reduce_sum(self.ctx, [loss_sum, loss_count, images, skipped])
        return {"train_loss": loss_sum / max(loss_count, 1), "images": images, "skipped": int(skipped),
                "seconds": seconds, "lr": self.optimizer.param_groups[0]["lr"]}

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.amp_dtype)

    def _check_finite(self, loss: torch.Tensor, epoch: int, batch: int) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        if self.ctx.distributed:
            torch.distributed.all_reduce(bad)
        if bad.item() == 0:
            return
        latest = self.ckpt_dir / "latest.txt"
        if latest.is_file():
            kept = (f"the last good checkpoint, {self.ckpt_dir / latest.read_text().strip()} (epoch "
                    f"{self._epochs_done}), is kept: continue from it with --resume and a lower "
                    "run_config.base_lr or a grad_clip")
        else:
            kept = "no checkpoint was written yet: lower run_config.base_lr or set run_config.grad_clip and restart"
        raise TrainingDiverged(f"non-finite training loss ({loss.item()}) at epoch {epoch + 1}, batch {batch}; "
                               f"training stopped, {kept}")

    # --- evaluation ------------------------------------------------------------------------------------
    def validate(self) -> dict[str, float] | None:
        if self.val_set is None:
            return None
        rc, dp = self.cfg.run_config, self.cfg.data_provider
        results = []
        for size in rc.eval_image_size:
            if rc.reset_bn:
                self._reset_bn(size)
            self.val_set.transform = val_transform(dp, size)
            loader = build_eval_loader(self.val_set, dp.test_batch_size or 2 * dp.base_batch_size, rank=self.ctx.rank,
                                       world_size=self.ctx.world_size, workers=dp.n_worker, device=self.device)
            results.append(evaluate(self.ema.module, loader, self.device, self.ctx, self.amp_dtype,
                                    progress=self.progress, desc=f"val {size}px"))
        return {key: sum(r[key] for r in results) / len(results) for key in ("top1", "top5", "loss")}

    def _reset_bn(self, size: int) -> None:
        """BN statistics of the EMA model from a seeded subset of training images at ``size``."""
        rc, dp = self.cfg.run_config, self.cfg.data_provider
        g = torch.Generator().manual_seed(self.seed)
        subset = torch.randperm(len(self.train_set), generator=g)[:rc.reset_bn_size].tolist()
        subset_set = copy.copy(self.train_set)
        subset_set.transform = train_transform(dp, size)
        loader = build_eval_loader(subset_set, rc.reset_bn_batch_size, rank=self.ctx.rank,
                                   world_size=self.ctx.world_size, workers=dp.n_worker, device=self.device,
                                   indices=subset)
        reestimate_bn(self.ema.module, loader, self.device, self.ctx, self.amp_dtype)

    # --- checkpoints -----------------------------------------------------------------------------------
    def save(self, epoch: int, is_best: bool, rng: list[dict]) -> None:
        state = {
            "state_dict": self.model.state_dict(), "epoch": epoch, "best_val": self.best_top1,
            "last_val": self.last_top1, "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(), "ema": {self.cfg.ema_decay: self.ema.module.state_dict()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None, "rng": rng,
            "stats": dict(self.stats), "global_step": (epoch + 1) * self.batches_per_epoch,
            "world_size": self.ctx.world_size,
        }
        _save_atomic(state, self.ckpt_dir / "checkpoint.pt")
        if is_best:
            _save_atomic(state, self.ckpt_dir / "model_best.pt")
            _save_atomic(self._eval_weights(), self.ckpt_dir / "evalmodel.pt")
        _write_text_atomic("checkpoint.pt\n", self.ckpt_dir / "latest.txt")

    def _eval_weights(self) -> dict[str, torch.Tensor]:
        """EMA weights as the original publishes them: a bare state dict in the original key layout."""
        return to_original_layout(self.ema.module.state_dict(), self.model)

    def _gather_rng(self) -> list[dict]:
        state = _rng_state()
        if not self.ctx.distributed:
            return [state]
        gathered: list[Any] = [None] * self.ctx.world_size
        torch.distributed.all_gather_object(gathered, state)
        return gathered

    def _log_metrics(self, row: dict[str, Any]) -> None:
        path = self.run_dir / "metrics.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_METRICS)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k) for k in _METRICS})

    # --- the run ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.prepare_run_dir()
        wall_start = time.perf_counter()
        wall_before = self.stats["wall_s"]
        self._epochs_done = self.start_epoch
        ran = 0
        for epoch in range(self.start_epoch, self.epochs):
            if self.stop_after is not None and ran >= self.stop_after:
                break
            t = self.train_epoch(epoch)
            val = self.validate()
            diff = broadcast_max_diff(self.ctx, self.model)
            self.stats["train_images"] += t["images"]
            self.stats["train_s"] += t["seconds"]
            self.stats["skipped_images"] += t["skipped"]
            is_best = False
            if val is not None:
                self.last_top1 = val["top1"]
                is_best = self.best_top1 is None or val["top1"] > self.best_top1
                self.best_top1 = val["top1"] if is_best else self.best_top1
            self.stats["wall_s"] = wall_before + time.perf_counter() - wall_start
            rng = self._gather_rng()
            if self.ctx.is_main:
                self.save(epoch, is_best, rng)
                self._log_metrics({
                    "epoch": epoch + 1, "lr": t["lr"], "train_loss": round(t["train_loss"], 6),
                    "val_loss": val and round(val["loss"], 6), "val_top1": val and round(val["top1"], 4),
                    "val_top5": val and round(val["top5"], 4), "best_top1": self.best_top1,
                    "skipped_images": t["skipped"], "images_per_s": round(t["images"] / t["seconds"], 2),
                    "epoch_s": round(t["seconds"], 2), "rank_param_max_diff": diff})
            if t["skipped"] and self.ctx.is_main:
                _logger.warning("epoch %d: %d unreadable image(s) skipped", epoch + 1, t["skipped"])
            self.log("epoch %d/%d: train loss %.4f, lr %.3g%s, %.1f images/s", epoch + 1, self.epochs,
                         t["train_loss"], t["lr"],
                         f", val top-1 {val['top1']:.2f} (best {self.best_top1:.2f}) top-5 {val['top5']:.2f}"
                         if val else "", t["images"] / t["seconds"])
            self._epochs_done = epoch + 1
            ran += 1
            self.ctx.barrier()
        finished = self._epochs_done >= self.epochs
        summary = {
            "epochs": self._epochs_done, "finished": finished, "final_top1": self.last_top1,
            "best_top1": self.best_top1, "images_per_s": self.stats["train_images"] / max(self.stats["train_s"], 1e-9),
            "wall_s": self.stats["wall_s"], "skipped_images": self.stats["skipped_images"],
            "model": self.cfg.net_config.name, "world_size": self.ctx.world_size,
            "global_batch": global_batch_size(self.cfg, self.ctx.world_size), "peak_lr": self.peak_lr,
            "rank_param_max_diff": broadcast_max_diff(self.ctx, self.model),
        }
        if self.ctx.is_main:
            if finished:
                _save_atomic(self._eval_weights(), self.ckpt_dir / "evalmodel_final.pt")
            _write_text_atomic(json.dumps(summary, indent=1) + "\n", self.run_dir / "summary.json")
        return summary


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False, seed: int = 0, amp: str = "none",
          device: str | None = None, stop_after_epochs: int | None = None, progress: bool = True,
          ctx: DistContext | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` and return the summary (also written to ``run_dir/summary.json``).

    Args:
        resume: continue from ``run_dir/checkpoint/latest.txt`` exactly where it stopped (weights,
            optimizer, EMA, scaler, random streams, epoch).
        seed: initial weights come from ``seed`` on every rank; rank r's randomness from ``seed + r``.
        amp: ``none`` (fp32, the original's default), ``bf16`` or ``fp16`` (CUDA, with a loss scaler).
        stop_after_epochs: stop (resumably) after this many epochs of this invocation, e.g. to fit a job
            time limit; the learning-rate schedule still spans the whole recipe.
        ctx: process group context; by default joined from torchrun's environment (or a world of one).
    """
    own = ctx is None
    ctx = ctx or init_distributed(device)
    try:
        trainer = _Trainer(cfg, Path(run_dir), ctx, resume=resume, seed=seed, amp=amp,
                           stop_after_epochs=stop_after_epochs, progress=progress)
        return trainer.run()
    finally:
        if own:
            ctx.close()


