"""The project's model families. Importing this package registers every factory with timm, so
``timm.create_model`` knows them too."""
from lowformer.models._registry import (
    DuplicateRegistrationError, UnknownModelError, create_model, list_models, register_aliases, register_feature_cls,
    register_pretrained_cfg_overlay, register_project_models, resolve_model_name,
)
from lowformer.models.lowformer import (
    LOWFORMER_MODELS, get_lowformer_b0, get_lowformer_b1, get_lowformer_b3, get_lowformer_b15,
    get_lowformer_E1, get_lowformer_E2, get_lowformer_E3,
)
from lowformer.models.visformer import VISFORMER_MODELS
from lowformer.models import dwnet, edgeformer, featured  # noqa: F401  (importing registers the families)

__all__ = [
    "DuplicateRegistrationError", "UnknownModelError", "create_model", "list_models", "register_aliases",
    "register_feature_cls",
    "register_pretrained_cfg_overlay", "register_project_models", "resolve_model_name", "LOWFORMER_MODELS",
    "VISFORMER_MODELS",
    "get_lowformer_b0", "get_lowformer_b1", "get_lowformer_b15", "get_lowformer_b3",
    "get_lowformer_E1", "get_lowformer_E2", "get_lowformer_E3",
]
