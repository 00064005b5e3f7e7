"""The comparison backbones of the original benchmark (``eval_cls_model.py --other NAME``) that timm has, by
the short names the original accepts.

The original resolves ``--other`` by substring tests in a fixed order; here every name it accepts for a family
that timm has is an alias of the timm model (``mobileones1`` -> ``mobileone_s1``), and the featured examples'
timm models join the project's list. The six families timm lacks live beside this module and register their
own short names.
"""
from typing import Dict, List

import timm

from lowformer.models._registry import ModelRecord, register_record

__all__ = ["FEATURED_ALIASES", "FEATURED_EXAMPLES"]


def _series(prefix: str, target: str, suffixes: List[str]) -> Dict[str, str]:
    return {f"{prefix}{s}": target.format(s) for s in suffixes}


# Every short name the original accepts for a family timm has (spellings that crash there included where the
# intent is clear, e.g. ``ghostnetv1.0``). Names that already are timm names (fastvit_*, shvit_s*, repvit_m*,
# resnet*) need no alias.
FEATURED_ALIASES: Dict[str, str] = {
    **_series("mobileones", "mobileone_s{}", ["0", "1", "2", "3", "4"]),
    "ghostnet1.0": "ghostnetv2_100", "ghostnet1.3": "ghostnetv2_130", "ghostnet1.6": "ghostnetv2_160",
    "ghostnetv1.0": "ghostnetv2_100", "ghostnetv1.3": "ghostnetv2_130", "ghostnetv1.6": "ghostnetv2_160",
    **_series("efficientvitm", "efficientvit_m{}", ["0", "1", "2", "3", "4", "5"]),
    **_series("pvtv2", "pvt_v2_{}", ["b0", "b1", "b2", "b2_li", "b3", "b4", "b5"]),
    "mobilenetv3large": "mobilenetv3_large_100", "mobilenetv3small": "mobilenetv3_small_100",
    **_series("coatnet", "coatnet_{}_224", ["0", "1", "2", "3", "4"]),
    **_series("efficientformerv2", "efficientformerv2_{}", ["s0", "s1", "s2", "l"]),
}

# The 17 examples of the original's featured_models.txt, as spelled there, and the registry name each means
# (the featured spellings that crash in the original, iformers / ghostnetv1.0 / fatb0, included).
FEATURED_EXAMPLES: Dict[str, str] = {
    "fastvit_t8": "fastvit_t8", "efficientmodxs": "efficientmodxs", "mobilevigm": "mobilevigm",
    "iformers": "iformers", "mobileones1": "mobileone_s1", "ffnet1": "ffnet1", "ghostnetv1.0": "ghostnetv2_100",
    "efficientvitm5": "efficientvit_m5", "edgevitxs": "edgevitxs", "pvtv2b0": "pvt_v2_b0", "fatb0": "fatb0",
    "mobilenetv3large": "mobilenetv3_large_100", "coatnet0": "coatnet_0_224",
    "efficientformerv2s1": "efficientformerv2_s1", "resnet50": "resnet50", "shvit_s4": "shvit_s4",
    "repvit_m2_3": "repvit_m2_3",
}

# The featured examples' timm models, offered as the project's own (``lowformer models`` lists them with MACs;
# every other variant of these families is reachable by name). ResNet-50 stays a plain timm model: it is the
# generic baseline, not one of the efficient backbones the project lists.
_FEATURED_TIMM_MODELS = sorted(n for n in FEATURED_EXAMPLES.values() if timm.is_model(n) and n != "resnet50")


def _register() -> None:
    """One record per timm model named here: its aliases, and listed when it is a featured example."""
    for name in sorted(set(FEATURED_ALIASES.values()) | set(_FEATURED_TIMM_MODELS)):
        aliases = tuple(a for a, target in FEATURED_ALIASES.items() if target == name)
        register_record(ModelRecord(name, aliases=aliases, listed=name in _FEATURED_TIMM_MODELS))


_register()
