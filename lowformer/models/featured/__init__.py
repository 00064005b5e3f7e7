"""Featured comparison backbones that timm lacks (the original benchmark's `--other` zoo), re-implemented
exactly (see each module's docstring).

Importing a module registers its factories with timm and its original short names as aliases."""
from lowformer.models.featured import (
    edgevit, efficientmod, fat, ffnet, inception_transformer, mobilevig, timm_families,
)

__all__ = ["edgevit", "efficientmod", "fat", "ffnet", "inception_transformer", "mobilevig", "timm_families"]
