"""The epoch loop shared by every task: one process or many (torchrun), resumable, committed per epoch.

Per micro-batch the schedule sets the learning rate and the drop-path rates from the global step (so a
resumed run continues the same curves) and :func:`~lowformer.train.step.train_step` runs the task's
loss; after each epoch the task validates the EMA model, and the epoch is committed to the run
directory (:mod:`lowformer.train.rundir`) from one :class:`~lowformer.train.state.TrainState`. What a
task provides is described in :mod:`lowformer.train.task`.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from timm.utils import random_seed

from lowformer.errors import LowformerError
from lowformer.train.config import (
    RESUME_SAFE_KEYS,
    TrainConfig,
    config_changes,
    config_from_dict,
    config_to_dict,
    global_batch_size,
    peak_lr,
)
from lowformer.train.distributed import (
    DistContext,
    all_reduce_sum,
    broadcast_object,
    init_distributed,
    rank_max_diff,
)
from lowformer.train.logs import RunLogger
from lowformer.train.rundir import RunDir
from lowformer.train.schedule import TrainSchedule
from lowformer.train.setup import DropPathSchedule, LowformerEma, build_optimizer, center_tap_small_maps, check_schedule
from lowformer.train.state import TrainState, rng_state, set_rng_state
from lowformer.train.step import AMP_MODES, NonFiniteLoss, StepParts, amp_mode, train_step
from lowformer.train.task import EvalInfo, StepInfo, TaskFactory, create_task

__all__ = ["train", "Trainer", "TrainingDiverged", "AMP_MODES"]

_logger = logging.getLogger(__name__)


class TrainingDiverged(LowformerError, RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


def _on_main(ctx: DistContext, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0; a LowformerError there is raised on every rank (no rank left waiting)."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except LowformerError as e:
            error = e
    message = broadcast_object(ctx, None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise LowformerError(message)
    return result


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, ctx: DistContext, *, task: TaskFactory = None,
                 resume: bool = False, seed: int = 0, amp: str = "none", stop_after_epochs: int | None = None,
                 progress: bool = True, allow_config_change: bool = False, initial_checkpoint: str | None = None,
                 log_interval: int = 50, log_wandb: bool = False) -> None:
        self.cfg, self.ctx, self.rd = cfg, ctx, RunDir(run_dir)
        self.resume, self.seed, self.stop_after = resume, seed, stop_after_epochs
        self.allow_config_change = allow_config_change
        self.progress = progress and ctx.is_main
        self.log = _logger.info if ctx.is_main else (lambda *args: None)
        self.device = ctx.device
        # Every argument is checked before any data is read or any file written.
        if stop_after_epochs is not None and stop_after_epochs < 1:
            raise LowformerError(f"--stop-after-epochs {stop_after_epochs}: must be at least 1")
        if log_interval < 1:
            raise LowformerError(f"--log-interval {log_interval}: must be at least 1")
        if initial_checkpoint is not None:
            if resume:
                raise LowformerError("--initial-checkpoint starts a new run; --resume continues from the run's own "
                                     "checkpoint: give one of the two")
            if not Path(initial_checkpoint).is_file():
                raise LowformerError(f"--initial-checkpoint '{initial_checkpoint}': file not found")
        if log_wandb:
            import importlib.util
            if importlib.util.find_spec("wandb") is None:
                raise LowformerError("--log-wandb: the wandb package is not installed; pip install wandb, or train "
                                     "without --log-wandb")
        self.log_interval, self.log_wandb = log_interval, log_wandb
        self.amp_dtype, self.scaler = amp_mode(amp, self.device)
        check_schedule(cfg)
        self.task = create_task(cfg, ctx, seed) if task is None else create_task(cfg, ctx, seed, task)

        # Same initial weights on every rank and for any world size; then per-rank randomness.
        torch.manual_seed(seed)
        self.model = center_tap_small_maps(self.task.build_model().to(self.device))
        if cfg.run_config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.initial_checkpoint = initial_checkpoint
        random_seed(seed + ctx.rank)
        self.drop_path = DropPathSchedule(self.model, cfg.backbone_drop.drop_prob, cfg.backbone_drop.linear_decay,
                                          cfg.backbone_drop.skip)
        self.ema = LowformerEma(self.model, decay=cfg.ema_decay)
        self.ddp = self.model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)

        self.loader = self.task.build_train_loader()
        self.peak_lr = peak_lr(cfg, ctx.world_size)
        self.optimizer = build_optimizer(self.model, cfg, self.peak_lr)
        self.schedule = TrainSchedule.build(cfg, len(self.loader), self.optimizer)
        self.parts = StepParts(model=self.model, ddp=self.ddp, optimizer=self.optimizer, ema=self.ema,
                               scaler=self.scaler, amp_dtype=self.amp_dtype, device=self.device,
                               grad_clip=cfg.run_config.grad_clip, distributed=ctx.distributed)
        self.state = TrainState(ema_decay=cfg.ema_decay, metric=self.task.metric, world_size=ctx.world_size,
                                config=config_to_dict(cfg))
        self.columns = ["epoch", "lr", "train_loss", *(f"val_{m}" for m in self.task.metric_names),
                        f"best_{self.task.metric}", "skipped_images", "images_per_s", "epoch_s", "rank_param_max_diff"]
        self.logger: RunLogger | None = None

    # --- set-up of the run directory -------------------------------------------------------------------
    def prepare(self) -> None:
        """Lock the directory, check it against the request, resume (repairing a half-committed epoch)."""
        changed = _on_main(self.ctx, self._check_run_dir)
        if self.resume:
            self._load()
        elif self.initial_checkpoint is not None:
            self.log("%s", self.task.load_initial(self.model, Path(self.initial_checkpoint)))
            self.ema.module.load_state_dict(self.model.state_dict())
        if self.ctx.is_main and (not self.resume or changed):
            # The run's record is (re)written only now, after the request proved consistent with it.
            self.rd.write_text(self.rd.config, yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
            self.rd.write_text(self.rd.arch, str(self.model) + "\n")
        self.logger = RunLogger(self.rd.path, active=self.ctx.is_main, log_wandb=self.log_wandb,
                                config_text=yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
        self.ctx.barrier()
        extra = self.task.describe()
        self.log("%s: %s%s%d processes x %d images x bsizemult %d = global batch %d, peak lr %.4g (base_lr x "
                 "bsizemult x world size), %d epochs (%d warm-up), %d batches/epoch", self.cfg.net_config.name, extra,
                 ", " if extra else "", self.ctx.world_size, self.cfg.data_provider.base_batch_size,
                 self.cfg.run_config.bsizemult, global_batch_size(self.cfg, self.ctx.world_size), self.peak_lr,
                 self.schedule.epochs, self.cfg.run_config.warmup_epochs, self.schedule.batches_per_epoch)

    def _check_run_dir(self) -> bool:
        rd = self.rd
        rd.lock()
        try:
            rd.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for stale in rd.remove_stale_tmp():
                _logger.warning("removed %s, left by an interrupted write", stale)
            if not self.resume and rd.has_run():
                raise LowformerError(f"run directory '{rd.path}' already holds a run; add --resume to continue it or "
                                     "choose another --path")
            if self.resume and not rd.checkpoint.is_file():
                raise LowformerError(f"--resume: no checkpoint in '{rd.ckpt_dir}' (checkpoint.pt missing); start "
                                     "without --resume")
            return self.resume and self._compare_config()
        except BaseException:
            rd.unlock()
            raise

    def _compare_config(self) -> bool:
        if not self.rd.config.is_file():
            _logger.warning("--resume: %s is missing, the requested config cannot be compared", self.rd.config)
            return True
        stored = yaml.safe_load(self.rd.config.read_text(encoding="utf-8")) or {}
        with contextlib.suppress(LowformerError):  # fill keys added since the run started with their defaults
            stored = config_to_dict(config_from_dict(stored))
        changes = config_changes(stored, config_to_dict(self.cfg))
        if not changes:
            return False
        refused = [c for c in changes if c[0] not in RESUME_SAFE_KEYS]
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in (refused or changes)[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        if refused and not self.allow_config_change:
            raise LowformerError(f"--resume: the requested config changes {shown}{more} of the stored run "
                                 f"'{self.rd.config}'; these alter the model or the schedule: resume with the stored "
                                 "config, or add --allow-config-change to accept the change")
        _logger.warning("--resume with a changed config: %s%s", shown, more)
        return True

    def _load(self) -> None:
        from lowformer.checkpoints import read_checkpoint
        path = self.rd.checkpoint
        state = TrainState.from_checkpoint(read_checkpoint(path), path, self.cfg.ema_decay)
        try:
            self.model.load_state_dict(state.model)
            self.ema.module.load_state_dict(state.ema)
            self.optimizer.load_state_dict(state.optimizer)
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()
            raise LowformerError(f"--resume: '{path}' does not fit the requested model or optimizer "
                                 f"({first[1].strip() if len(first) > 1 else first[0][:200]})") from None
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        state.config, state.world_size = config_to_dict(self.cfg), self.ctx.world_size
        self.state = state
        if len(state.rng) == self.ctx.world_size:
            set_rng_state(state.rng[self.ctx.rank])
        else:
            _logger.warning("--resume with %d processes, the checkpoint was written by %d: random streams restart",
                            self.ctx.world_size, len(state.rng))
        _on_main(self.ctx, self._repair)
        self.log("resumed from %s (epoch %d done)", path, state.epochs_done)

    def _repair(self) -> None:
        """Complete an epoch whose commit was interrupted after ``checkpoint.pt`` (roll forward)."""
        committed, epoch = self.rd.committed_epoch(), self.state.epoch
        if committed is not None and committed != -2 and epoch < committed:
            raise LowformerError(f"--resume: '{self.rd.pointer}' names epoch {committed + 1} but "
                                 f"'{self.rd.checkpoint}' holds epoch {epoch + 1}; the run directory was changed "
                                 "by hand")
        if committed is None or epoch > committed:
            _logger.warning("epoch %d was interrupted while it was being saved: completing its files from %s",
                            epoch + 1, self.rd.checkpoint)
            self.commit()

    # --- one epoch -------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm import tqdm
        k = self.cfg.run_config.bsizemult
        bpe = self.schedule.batches_per_epoch
        sampler = getattr(self.loader, "batch_sampler", None)
        (sampler if hasattr(sampler, "set_epoch") else self.loader.sampler).set_epoch(epoch)
        self.ddp.train()
        loss_sum = loss_count = 0.0
        images = skipped = 0
        start = time.perf_counter()
        bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{self.schedule.epochs}", disable=not self.progress,
                   dynamic_ncols=True, leave=False)
        for i, batch in enumerate(bar):
            step = self.schedule.global_step(epoch, i)
            progress = self.schedule.at(step)
            self.drop_path.set_progress(progress)
            if step == 0:
                self.logger.images("train/first_batch", self.task.preview(batch), 0)
            info = StepInfo(epoch=epoch, batch=i, step=step, progress=progress, device=self.device,
                            ema_model=self.ema.module)
            try:
                out = train_step(self.parts, lambda m: self.task.loss(m, batch, info), first=i % k == 0,
                                 update=(i + 1) % k == 0 or i + 1 == bpe, step=step)
            except NonFiniteLoss as e:
                raise self._diverged(e.value, epoch, i) from None
            skipped += out.skipped
            loss_sum += out.loss.item() * out.samples
            loss_count += out.samples
            images += out.samples
            lr = self.optimizer.param_groups[0]["lr"]
            if self.progress:
                bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}", lr=f"{lr:.3g}", bs=out.samples, **out.logs)
            if (i + 1) % self.log_interval == 0:
                self.logger.scalars("train", {"loss": out.loss.item(), "lr": lr, **out.logs}, step + 1)
                if not self.progress:
                    self.log("epoch %d/%d, batch %d/%d: loss %.4f (epoch mean %.4f), lr %.3g", epoch + 1,
                             self.schedule.epochs, i + 1, bpe, out.loss.item(), loss_sum / loss_count, lr)
        seconds = time.perf_counter() - start
        loss_sum, loss_count, images, skipped = all_reduce_sum(self.ctx, [loss_sum, loss_count, images, skipped])
        return {"train_loss": loss_sum / max(loss_count, 1), "images": images, "skipped": int(skipped),
                "seconds": seconds, "lr": self.optimizer.param_groups[0]["lr"]}

    def _diverged(self, value: float, epoch: int, batch: int) -> TrainingDiverged:
        if self.rd.checkpoint.is_file() and self.state.epochs_done > 0:
            kept = (f"the last good checkpoint, {self.rd.checkpoint} (epoch {self.state.epochs_done}), is kept: "
                    "continue from it with --resume --allow-config-change and a lower run_config.base_lr or a "
                    "run_config.grad_clip")
        else:
            kept = "no checkpoint was written yet: lower run_config.base_lr or set run_config.grad_clip and restart"
        return TrainingDiverged(f"non-finite training loss ({value}) at epoch {epoch + 1}, batch {batch}; "
                                f"training stopped, {kept}")

    # --- checkpoints -----------------------------------------------------------------------------------
    def _gather_rng(self) -> list[dict]:
        state = rng_state()
        if not self.ctx.distributed:
            return [state]
        gathered: list[Any] = [None] * self.ctx.world_size
        torch.distributed.all_gather_object(gathered, state)
        return gathered

    def summary(self) -> dict[str, Any]:
        s, m = self.state, self.task.metric
        return {
            "epochs": s.epochs_done, "finished": s.epochs_done >= self.schedule.epochs,
            f"final_{m}": s.last.get(m) if s.last else None, f"best_{m}": s.best,
            "best_epoch": None if s.best_epoch is None else s.best_epoch + 1,
            "images_per_s": s.stats["train_images"] / max(s.stats["train_s"], 1e-9), "wall_s": s.stats["wall_s"],
            "skipped_images": s.stats["skipped_images"], "model": self.cfg.net_config.name, "task": self.task.name,
            "world_size": self.ctx.world_size, "global_batch": global_batch_size(self.cfg, self.ctx.world_size),
            "peak_lr": self.peak_lr, "rank_param_max_diff": s.stats["rank_param_max_diff"],
            "rank_buffer_max_diff": s.stats.get("rank_buffer_max_diff", 0.0),
        }

    def _metrics_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.state.history:
            writer.writerow({k: row.get(k) for k in self.columns})
        return buf.getvalue()

    def commit(self) -> None:
        """Write the epoch of ``self.state``: every file first, the pointer last (see ``rundir``)."""
        rd, s = self.rd, self.state
        ckpt = s.to_checkpoint()
        rd.save(ckpt, rd.checkpoint)
        if s.best_epoch == s.epoch or s.epochs_done >= self.schedule.epochs:
            weights = self.task.eval_weights(self.ema.module, self.model)
            if s.best_epoch == s.epoch:
                rd.save(ckpt, rd.best)
                rd.save(weights, rd.evalmodel)
            if s.epochs_done >= self.schedule.epochs:
                rd.save(weights, rd.final)
        rd.write_text(rd.metrics, self._metrics_csv())
        rd.write_text(rd.summary, json.dumps(self.summary(), indent=1) + "\n")
        rd.flip_pointer(s.epoch)

    # --- the run ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            self.prepare()
            return self._run()
        finally:
            if self.logger is not None:
                self.logger.close()
            if self.ctx.is_main:
                self.rd.unlock()

    def _run(self) -> dict[str, Any]:
        wall_start, wall_before = time.perf_counter(), self.state.stats["wall_s"]
        m = self.task.metric
        ran = 0
        for epoch in range(self.state.epochs_done, self.schedule.epochs):
            if self.stop_after is not None and ran >= self.stop_after:
                break
            t = self.train_epoch(epoch)
            val = self.task.validate(self.ema.module, EvalInfo(device=self.device, amp_dtype=self.amp_dtype,
                                                               progress=self.progress, epoch=epoch))
            param_diff, buffer_diff = rank_max_diff(self.ctx, self.model)
            s = self.state
            s.stats["train_images"] += t["images"]
            s.stats["train_s"] += t["seconds"]
            s.stats["skipped_images"] += t["skipped"]
            s.stats["rank_param_max_diff"], s.stats["rank_buffer_max_diff"] = param_diff, buffer_diff
            if val is not None:
                s.last = dict(val)
                if self.task.better(val[m], s.best):
                    s.best, s.best_epoch = val[m], epoch
            s.stats["wall_s"] = wall_before + time.perf_counter() - wall_start
            s.epoch, s.global_step = epoch, self.schedule.steps_done(epoch + 1)
            s.model, s.ema = self.model.state_dict(), self.ema.module.state_dict()
            s.optimizer = self.optimizer.state_dict()
            s.scheduler = self.schedule.scheduler.state_dict()
            s.scaler = self.scaler.state_dict() if self.scaler is not None else None
            s.rng = self._gather_rng()
            row = {"epoch": epoch + 1, "lr": t["lr"], "train_loss": round(t["train_loss"], 6),
                   f"best_{m}": s.best, "skipped_images": t["skipped"],
                   "images_per_s": round(t["images"] / t["seconds"], 2), "epoch_s": round(t["seconds"], 2),
                   "rank_param_max_diff": param_diff}
            row.update({f"val_{k}": (round(val[k], 6) if val else None) for k in self.task.metric_names})
            s.history = [*s.history, row]
            _on_main(self.ctx, self.commit)  # a failed write stops every rank, not only rank 0
            if self.ctx.is_main:
                self.logger.scalars("epoch", {k: v for k, v in row.items() if k != "epoch"}, epoch + 1)
                self.logger.flush()
            if t["skipped"] and self.ctx.is_main:
                _logger.warning("epoch %d: %d unreadable image(s) skipped", epoch + 1, t["skipped"])
            if buffer_diff and self.ctx.is_main:
                _logger.info("epoch %d: parameters differ across ranks by at most %g; buffers (BatchNorm running "
                             "statistics, per rank by design) by %g", epoch + 1, param_diff, buffer_diff)
            self.log("epoch %d/%d: train loss %.4f, lr %.3g%s, %.1f images/s", epoch + 1, self.schedule.epochs,
                     t["train_loss"], t["lr"],
                     f", val {m} {val[m]:.2f} (best {s.best:.2f})" if val else "", t["images"] / t["seconds"])
            ran += 1
            self.ctx.barrier()
        return self.summary()


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, task: TaskFactory = None, resume: bool = False,
          seed: int = 0, amp: str = "none", device: str | None = None, stop_after_epochs: int | None = None,
          progress: bool = True, allow_config_change: bool = False, initial_checkpoint: str | None = None,
          log_interval: int = 50, log_wandb: bool = False, ctx: DistContext | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` and return the summary (also written to ``run_dir/summary.json``).

    Args:
        task: the task to train: a registered name or a ``(cfg, ctx, seed) -> Task`` factory (a Task
            subclass); by default the one the config's ``task`` key names (classification).
        resume: continue from ``run_dir``'s last committed epoch exactly (weights, optimizer, EMA, scaler,
            random streams); a config that changes the model or the schedule is refused unless
            ``allow_config_change``.
        seed: initial weights come from ``seed`` on every rank; rank r's randomness from ``seed + r``.
        amp: ``none`` (fp32, the original's default), ``bf16`` or ``fp16`` (CUDA, with a loss scaler).
        stop_after_epochs: stop (resumably) after this many epochs of this invocation, e.g. to fit a job
            time limit; the learning-rate schedule still spans the whole recipe.
        initial_checkpoint: start a new run from these weights (any layout the loaders read); the task
            re-initialises what does not fit (the classifier of another class count) and says so.
        log_interval: micro-batches between TensorBoard scalars (and log lines without progress bars).
        log_wandb: also log to Weights & Biases (needs the ``wandb`` package).
        ctx: process group context; by default joined from torchrun's environment (or a world of one).
    """
    own = ctx is None
    ctx = ctx or init_distributed(device)
    try:
        trainer = Trainer(cfg, run_dir, ctx, task=task, resume=resume, seed=seed, amp=amp,
                          stop_after_epochs=stop_after_epochs, progress=progress,
                          allow_config_change=allow_config_change, initial_checkpoint=initial_checkpoint,
                          log_interval=log_interval, log_wandb=log_wandb)
        return trainer.run()
    finally:
        if own:
            ctx.close()
