"""The task plug-in interface: what a task (classification, detection, segmentation) gives the loop.

The loop (:mod:`lowformer.train.loop`) owns everything shared: process group (torchrun, gloo/nccl),
seeding, AMP, the optimizer and per-micro-batch cosine schedule, stochastic depth, EMA, ``bsizemult``
accumulation, the NaN stop, progress bars and log intervals, the run directory (atomic per-epoch commit,
lock, exact resume), metrics.csv / summary.json / TensorBoard. A task subclasses :class:`Task` and
provides::

    name                    registry name, the config's top-level ``task:`` value
    metric, higher_is_better the key of ``validate()``'s dict that picks the best epoch, and its direction
    metric_names            the validation keys written as ``val_<key>`` columns, in order
    build_model()           the network (weights from ``torch.manual_seed(seed)``, same on every rank)
    build_train_loader()    the rank's loader; its batch sampler (or sampler) has ``set_epoch``
    loss(model, batch, info) -> LossOutput   forward + loss of one micro-batch (device moves included)
    validate(model, info)   -> dict of metrics (summed over ranks) or None when the run has no validation
    eval_weights(ema_model, model) -> the state dict published as evalmodel.pt
    load_initial(model, path) -> one line saying what was loaded (``--initial-checkpoint``)
    preview(batch)          optional: an image batch (N, 3, H, W, 0-1) shown in TensorBoard

Tasks read their settings from the shared config groups (``data_provider``, ``run_config``,
``net_config``, ``backbone_drop``, ``ema_decay``) and from their own section registered with
:func:`lowformer.train.config.register_section`; :func:`register_task` makes ``task: NAME`` in a config
select them, and ``lowformer.train.train(cfg, run_dir, task=MyTask)`` takes a task class (or any
``(cfg, ctx, seed) -> Task`` factory) directly.

A minimal task, e.g. for a detector whose forward returns a dict of losses::

    class DetectionTask(Task):
        name, metric, metric_names = "detection", "bbox_map", ("bbox_map", "bbox_map_50")

        def build_model(self):          return create_detector(...)
        def build_train_loader(self):   return DataLoader(..., batch_sampler=...)  # set_epoch()
        def loss(self, model, batch, info):
            images, targets = batch
            losses = model([i.to(info.device) for i in images], [...])
            return LossOutput(sum(losses.values()), len(images), logs={k: v.item() for k, v in losses.items()})
        def validate(self, model, info): return {"bbox_map": ..., "bbox_map_50": ...}
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from lowformer.train.config import ConfigError, TrainConfig, import_builtin_task
from lowformer.train.distributed import DistContext
from lowformer.train.step import LossOutput

__all__ = ["Task", "StepInfo", "EvalInfo", "LossOutput", "TaskFactory", "register_task", "create_task"]


@dataclass
class StepInfo:
    """Where a micro-batch is: passed to :meth:`Task.loss`."""

    epoch: int
    batch: int
    step: int
    progress: float  # 0 during warm-up, 1 at the last step
    device: torch.device
    ema_model: nn.Module | None = None


@dataclass
class EvalInfo:
    """How to validate: passed to :meth:`Task.validate`."""

    device: torch.device
    amp_dtype: torch.dtype | None
    progress: bool
    epoch: int


class Task:
    """Base class of a training task; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    metric_names: ClassVar[tuple[str, ...]] = ()
    datasets: ClassVar[tuple[str, ...]] = ()  # the ``data_provider.dataset`` values it reads

    def __init__(self, cfg: TrainConfig, ctx: DistContext, seed: int) -> None:
        self.cfg, self.ctx, self.seed = cfg, ctx, seed

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_train_loader(self) -> DataLoader:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, info: StepInfo) -> LossOutput:
        raise NotImplementedError

    def validate(self, model: nn.Module, info: EvalInfo) -> dict[str, float] | None:
        raise NotImplementedError

    def eval_weights(self, ema_model: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
        return ema_model.state_dict()

    def load_initial(self, model: nn.Module, path: Path) -> str:
        raise NotImplementedError(f"the {self.name} task does not take --initial-checkpoint")

    def preview(self, batch: Any) -> torch.Tensor | None:
        return None

    def describe(self) -> str:
        """One line about the data, logged at start."""
        return ""

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.higher_is_better else value < best)


_TASKS: dict[str, Callable[[TrainConfig, DistContext, int], Task]] = {}


def register_task(name: str, factory: Callable[[TrainConfig, DistContext, int], Task]) -> None:
    if name in _TASKS and _TASKS[name] is not factory:
        raise ValueError(f"task '{name}' is already registered")
    _TASKS[name] = factory


TaskFactory = Union[str, Callable[[TrainConfig, DistContext, int], Task], None]


def create_task(cfg: TrainConfig, ctx: DistContext, seed: int, task: TaskFactory = None) -> Task:
    """The task ``task`` names or builds (a registered name or a factory), else the config's ``task``."""
    if task is not None and not isinstance(task, str):
        return task(cfg, ctx, seed)
    name = task or cfg.task
    if name not in _TASKS:
        import_builtin_task(name)
    if name not in _TASKS:
        raise ConfigError(f"config key 'task': unknown task '{name}' (known: {', '.join(sorted(_TASKS))})")
    known = getattr(_TASKS[name], "datasets", ())
    dataset = cfg.data_provider.dataset
    if dataset and known and dataset not in known:
        raise ConfigError(f"config key 'data_provider.dataset': the {name} task reads {', '.join(known)}, not "
                          f"'{dataset}' (or leave it empty)")
    return _TASKS[name](cfg, ctx, seed)
