"""``TrainState``: everything a run needs to continue exactly, and the one schema of its checkpoint files.

``checkpoint.pt`` and ``model_best.pt`` are ``TrainState.to_checkpoint()``; resuming reads them back with
``TrainState.from_checkpoint``. The keys below are the only place the file layout is spelled out. Besides
the trainer's own keys the file carries ``state_dict`` (the raw model) and ``state_dict_ema`` (the EMA
weights), the names timm's ``load_checkpoint(..., use_ema=True)`` reads.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowformer.errors import LowformerError

__all__ = ["TrainState", "rng_state", "set_rng_state", "FORMAT"]

FORMAT = "lowformer-train/2"


@dataclass
class TrainState:
    """The state after ``epoch`` (0-based index of the last finished epoch, -1 before the first)."""

    epoch: int = -1
    model: dict = field(default_factory=dict)
    ema: dict = field(default_factory=dict)
    ema_decay: float = 0.0
    optimizer: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    scaler: dict | None = None
    rng: list = field(default_factory=list)  # one entry per rank
    metric: str = "top1"  # the task's metric that picks the best epoch
    best: float | None = None
    best_epoch: int | None = None
    last: dict = field(default_factory=dict)  # the last validation's metrics
    history: list = field(default_factory=list)  # metrics.csv rows, one per finished epoch
    stats: dict = field(default_factory=lambda: {"train_images": 0.0, "train_s": 0.0, "wall_s": 0.0,
                                                 "skipped_images": 0, "rank_param_max_diff": 0.0})
    world_size: int = 1
    global_step: int = 0
    config: dict = field(default_factory=dict)

    @property
    def epochs_done(self) -> int:
        return self.epoch + 1

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "epoch": self.epoch, "state_dict": self.model, "state_dict_ema": self.ema,
            "ema": {self.ema_decay: self.ema}, "optimizer": self.optimizer, "lr_scheduler": self.scheduler,
            "scaler": self.scaler, "rng": self.rng, "metric": self.metric, "best_val": self.best,
            "best_epoch": self.best_epoch, "last_val": self.last, "history": self.history, "stats": self.stats,
            "world_size": self.world_size, "global_step": self.global_step, "config": self.config,
        }

    @classmethod
    def from_checkpoint(cls, obj: Any, path: str | Path, ema_decay: float) -> TrainState:
        """Read a training checkpoint (this format or the previous one); a bare weights file is refused."""
        required = ("epoch", "state_dict", "optimizer", "ema")
        if not isinstance(obj, dict) or any(k not in obj for k in required):
            raise LowformerError(
                f"--resume: '{path}' holds weights only, not a training checkpoint (no optimizer, EMA or epoch); "
                "start a new run and pass it as --initial-checkpoint to begin from its weights")
        ema = next((v for d, v in obj["ema"].items() if abs(float(d) - ema_decay) < 1e-12), None)
        if ema is None:
            raise LowformerError(f"--resume: '{path}' holds EMA weights for decay {list(obj['ema'])}, the "
                                 f"config says ema_decay {ema_decay}")
        last = obj.get("last_val")
        return cls(
            epoch=int(obj["epoch"]), model=obj["state_dict"], ema=ema, ema_decay=ema_decay,
            optimizer=obj["optimizer"], scheduler=obj.get("lr_scheduler") or {}, scaler=obj.get("scaler"),
            rng=list(obj.get("rng") or []), metric=obj.get("metric", "top1"), best=obj.get("best_val"),
            best_epoch=obj.get("best_epoch"), last=last if isinstance(last, dict) else {"top1": last},
            history=list(obj.get("history") or []), stats={**cls().stats, **dict(obj.get("stats") or {})},
            world_size=int(obj.get("world_size", 1)), global_step=int(obj.get("global_step", 0)),
            config=dict(obj.get("config") or {}))


def rng_state() -> dict[str, Any]:
    """This process's random streams (torch, python, numpy, CUDA) as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
