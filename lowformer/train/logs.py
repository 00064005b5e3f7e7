"""Where a run's numbers go besides metrics.csv: the log, TensorBoard event files and, when asked, W&B.

TensorBoard files live in the run directory itself (``RUN/events.out.tfevents.*``): scalars every
``log_interval`` steps (``train/loss``, ``train/lr``) and per epoch (``epoch/<column>``), the first
batch's augmented images (``train/first_batch``) and the config as text (``config``). W&B is imported
only when ``log_wandb`` is set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


__all__ = ["RunLogger"]


class RunLogger:
    """Writes only on the main process; every method is a no-op elsewhere."""

    def __init__(self, run_dir: Path, *, active: bool, config_text: str, log_wandb: bool = False,
                 project: str = "lowformer", run_name: str | None = None) -> None:
        self.active = active
        self.tb = None
        self.wandb = None
        if not active:
            return
        if log_wandb:
            import wandb  # present: the trainer checked before any work
            self.wandb = wandb.init(project=project, name=run_name or run_dir.name, dir=str(run_dir),
                                    config={"config_yaml": config_text}, resume="allow")
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(log_dir=str(run_dir))
        self.tb.add_text("config", "```\n" + config_text + "\n```", 0)

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        if not self.active:
            return
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k, v in numbers.items():
            self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in numbers.items()}, step=step)

    def images(self, tag: str, images: torch.Tensor | None, step: int) -> None:
        if not self.active or images is None:
            return
        self.tb.add_images(tag, images, step)
        if self.wandb is not None:
            import wandb
            self.wandb.log({tag: [wandb.Image(x) for x in images]}, step=step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
