"""The schedule of a run: where step t of epoch e is, its learning rate and its training progress.

One object answers every "where are we" question (global step, warm-up, progress for stochastic depth
and MESA, epochs), so a resumed run and a fresh one walk the same curves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowformer.train.config import TrainConfig, total_epochs
from lowformer.train.setup import build_scheduler

__all__ = ["TrainSchedule"]


@dataclass
class TrainSchedule:
    """Steps are micro-batches: ``warmup_steps`` of warm-up, then ``cosine_steps`` of cosine decay."""

    epochs: int
    batches_per_epoch: int
    warmup_steps: int
    cosine_steps: int
    scheduler: object | None = None

    @classmethod
    def build(cls, cfg: TrainConfig, batches_per_epoch: int,
              optimizer: torch.optim.Optimizer | None = None) -> TrainSchedule:
        rc = cfg.run_config
        sched = cls(epochs=total_epochs(cfg), batches_per_epoch=batches_per_epoch,
                    warmup_steps=rc.warmup_epochs * batches_per_epoch,
                    cosine_steps=max(1, rc.n_epochs * batches_per_epoch))
        if optimizer is not None:
            sched.scheduler = build_scheduler(optimizer, cfg, sched.warmup_steps, sched.cosine_steps)
        return sched

    def global_step(self, epoch: int, batch: int) -> int:
        return epoch * self.batches_per_epoch + batch

    def progress(self, step: int) -> float:
        """0 during warm-up, rising linearly to 1 at the last cosine step."""
        return max(0, step - self.warmup_steps) / self.cosine_steps

    def at(self, step: int) -> float:
        """Set the learning rate of ``step`` and return its progress."""
        if self.scheduler is not None:
            self.scheduler.step_update(step)
        return self.progress(step)

    def steps_done(self, epochs_done: int) -> int:
        return epochs_done * self.batches_per_epoch
