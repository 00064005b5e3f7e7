"""The original's --other names: aliases of timm models, deployed for timing, pending families named."""
from __future__ import annotations

import pytest
import timm
import torch

import lowformer
from lowformer.bench.complexity import count_params
from lowformer.bench.featured import (
    FEATURED_ALIASES, FEATURED_EXAMPLES, FamilyNotAvailableError, build_model, pending_family, resolve_model_name,
)

# Deployed parameter counts in millions, from featured-backbones.md section 2 (timm deploy column).
DEPLOYED_PARAMS_M = {
    "fastvit_t8": 4.00, "mobileones1": 4.76, "ghostnetv1.0": 6.16, "efficientvitm5": 12.44, "pvtv2b0": 3.67,
    "mobilenetv3large": 5.48, "coatnet0": 25.04, "efficientformerv2s1": 6.19, "resnet50": 25.56,
    "shvit_s4": 16.55, "repvit_m2_3": 22.93,
}
PENDING = {"efficientmodxs", "mobilevigm", "iformers", "ffnet1", "edgevitxs", "fatb0"}


def test_featured_examples_split_into_timm_and_pending_families():
    assert set(FEATURED_EXAMPLES) == set(DEPLOYED_PARAMS_M) | PENDING
    for name, registry_name in FEATURED_ALIASES.items():
        assert timm.is_model(registry_name), name
    listed = {resolve_model_name(n) for n in DEPLOYED_PARAMS_M} - {"resnet50"}
    assert listed <= set(lowformer.list_models()) and "coatnet_4_224" not in lowformer.list_models()
    assert resolve_model_name("ghostnet1.3") == "ghostnetv2_130" and resolve_model_name("pvtv2b2_li") == "pvt_v2_b2_li"


@pytest.mark.parametrize("name", sorted(FEATURED_EXAMPLES))
def test_featured_name_builds_deployed_and_runs_at_224(name):
    if pending_family(name):
        pytest.skip(f"the family of {name} has not landed")
    model = build_model(name)
    if name in DEPLOYED_PARAMS_M:
        assert count_params(model) / 1e6 == pytest.approx(DEPLOYED_PARAMS_M[name], abs=0.006)
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_pending_family_names_fail_with_the_family():
    pending = [n for n in sorted(PENDING) if pending_family(n)]
    if not pending:
        pytest.skip("every featured family has landed")
    for name in pending:
        with pytest.raises(FamilyNotAvailableError, match=f"'{name}' belongs to the .* family, which is not available"):
            resolve_model_name(name)
    with pytest.raises(lowformer.UnknownModelError) as e:
        resolve_model_name("fastvit_t99")
    assert not isinstance(e.value, FamilyNotAvailableError)
