"""Training with the published recipes: strict YAML configs, timm's parts, resumable, torchrun-ready."""
from lowformer.train.config import ConfigError, TrainConfig, load_config, parse_overrides, peak_lr
from lowformer.train.loop import AMP_MODES, TrainingDiverged, train

__all__ = ["AMP_MODES", "ConfigError", "TrainConfig", "TrainingDiverged", "load_config", "parse_overrides",
           "peak_lr", "train"]
