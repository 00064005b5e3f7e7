"""The original's --other names: aliases of timm models and the project's featured families, deployed for timing."""
from __future__ import annotations

import pytest
import timm
import torch

import lowformer
from lowformer.bench.complexity import count_params
from lowformer.bench.featured import FEATURED_ALIASES, FEATURED_EXAMPLES, build_model
from lowformer.models import resolve_model_name

# Deployed parameter counts in millions, from featured-backbones.md section 2 (timm deploy column).
DEPLOYED_PARAMS_M = {
    "fastvit_t8": 4.00, "mobileones1": 4.76, "ghostnetv1.0": 6.16, "efficientvitm5": 12.44, "pvtv2b0": 3.67,
    "mobilenetv3large": 5.48, "coatnet0": 25.04, "efficientformerv2s1": 6.19, "resnet50": 25.56,
    "shvit_s4": 16.55, "repvit_m2_3": 22.93,
}
# The six families timm lacks, implemented in lowformer.models.featured, by the featured spelling.
PROJECT_FAMILIES = {"efficientmodxs": "efficientmod_xs", "mobilevigm": "mobilevig_m",
                    "iformers": "inception_transformer_small", "ffnet1": "ffnet_1", "edgevitxs": "edgevit_xs",
                    "fatb0": "fat_b0"}


def test_featured_examples_are_timm_models_or_project_families():
    assert set(FEATURED_EXAMPLES) == set(DEPLOYED_PARAMS_M) | set(PROJECT_FAMILIES)
    for name, registry_name in PROJECT_FAMILIES.items():
        assert resolve_model_name(name) == registry_name and registry_name in lowformer.list_models()
    for name, registry_name in FEATURED_ALIASES.items():
        assert timm.is_model(registry_name), name
    listed = {resolve_model_name(n) for n in DEPLOYED_PARAMS_M} - {"resnet50"}
    assert listed <= set(lowformer.list_models()) and "coatnet_4_224" not in lowformer.list_models()
    assert resolve_model_name("ghostnet1.3") == "ghostnetv2_130" and resolve_model_name("pvtv2b2_li") == "pvt_v2_b2_li"


@pytest.mark.parametrize("name", sorted(FEATURED_EXAMPLES))
def test_featured_name_builds_deployed_and_runs_at_224(name):
    model = build_model(name)
    if name in DEPLOYED_PARAMS_M:
        assert count_params(model) / 1e6 == pytest.approx(DEPLOYED_PARAMS_M[name], abs=0.006)
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_unknown_featured_name_suggests_close_matches():
    with pytest.raises(lowformer.UnknownModelError, match="fastvit_t8"):
        resolve_model_name("fastvit_t88")
