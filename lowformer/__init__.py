"""lowformer: hardware-efficient vision backbones on timm.

``import lowformer`` registers the project's model families with timm. The public API:
``create_model``, ``list_models``, ``load_checkpoint``, ``imagenet_eval``, ``deploy`` and the original entry
points ``get_lowformer_*``. Training lives in ``lowformer.train``, benchmarking in ``lowformer.bench``.
"""
from lowformer import deploy  # a callable package: lowformer.deploy(model) and lowformer.deploy.onnx
from lowformer.bench import featured as _featured  # noqa: F401  (registers the original's --other names)
from lowformer.checkpoints import CheckpointError, load_checkpoint, read_checkpoint, weights_dir
from lowformer.errors import LowformerError
from lowformer.evaluate import imagenet_eval
from lowformer.models import (
    UnknownModelError,
    create_model,
    get_lowformer_b0,
    get_lowformer_b1,
    get_lowformer_b3,
    get_lowformer_b15,
    get_lowformer_E1,
    get_lowformer_E2,
    get_lowformer_E3,
    list_models,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "LowformerError", "UnknownModelError", "create_model", "deploy", "imagenet_eval",
    "list_models", "load_checkpoint",
    "read_checkpoint", "weights_dir", "get_lowformer_b0", "get_lowformer_b1", "get_lowformer_b15",
    "get_lowformer_b3", "get_lowformer_E1", "get_lowformer_E2", "get_lowformer_E3",
]
