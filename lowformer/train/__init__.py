"""Training with the published recipes: strict YAML configs, timm's parts, resumable, torchrun-ready.

The loop is shared by every task (:mod:`lowformer.train.task` describes the plug-in interface);
classification is registered here, detection and segmentation register theirs the same way.
"""
from lowformer.train.classification import ClassificationTask
from lowformer.train.config import ConfigError, TrainConfig, load_config, parse_overrides, peak_lr, register_section
from lowformer.train.loop import AMP_MODES, Trainer, TrainingDiverged, train
from lowformer.train.rundir import RunDir, RunDirError, RunDirLocked
from lowformer.train.state import TrainState
from lowformer.train.task import EvalInfo, LossOutput, StepInfo, Task, register_task

__all__ = ["AMP_MODES", "ClassificationTask", "ConfigError", "EvalInfo", "LossOutput", "RunDir", "RunDirError",
           "RunDirLocked", "StepInfo", "Task", "TrainConfig", "TrainState", "Trainer", "TrainingDiverged",
           "load_config", "parse_overrides", "peak_lr", "register_section", "register_task", "train"]
