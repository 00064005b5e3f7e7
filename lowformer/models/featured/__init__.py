"""Featured comparison backbones that timm lacks, re-implemented exactly (see each module's docstring).
Importing this package registers them with timm and their original short names as aliases."""
from lowformer.models.featured import efficientmod, ffnet, mobilevig

__all__ = ["efficientmod", "ffnet", "mobilevig"]
