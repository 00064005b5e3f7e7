"""The project's model families. Importing this package registers every factory with timm, so
``timm.create_model`` knows them too."""
from lowformer.models import dwnet, edgeformer, featured  # noqa: F401  (importing registers the families)
from lowformer.models._registry import (
    DuplicateRegistrationError,
    ModelRecord,
    UnknownModelError,
    create_model,
    list_models,
    model_record,
    register_aliases,
    register_feature_cls,
    register_pretrained_cfg_overlay,
    register_project_models,
    register_record,
    resolve_model_name,
)
from lowformer.models.lowformer import (
    LOWFORMER_MODELS,
    get_lowformer_b0,
    get_lowformer_b1,
    get_lowformer_b3,
    get_lowformer_b15,
    get_lowformer_E1,
    get_lowformer_E2,
    get_lowformer_E3,
)
from lowformer.models.visformer import VISFORMER_MODELS

__all__ = [
    "DuplicateRegistrationError", "ModelRecord", "UnknownModelError", "create_model", "list_models", "model_record",
    "register_aliases", "register_feature_cls", "register_pretrained_cfg_overlay", "register_project_models",
    "register_record", "resolve_model_name", "LOWFORMER_MODELS",
    "VISFORMER_MODELS",
    "get_lowformer_b0", "get_lowformer_b1", "get_lowformer_b15", "get_lowformer_b3",
    "get_lowformer_E1", "get_lowformer_E2", "get_lowformer_E3",
]
