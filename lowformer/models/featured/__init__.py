"""Featured comparison backbones that timm lacks (the original benchmark's `--other` zoo).

Importing a module registers its factories with timm and its original short names as aliases."""
from lowformer.models.featured import edgevit, fat, inception_transformer
