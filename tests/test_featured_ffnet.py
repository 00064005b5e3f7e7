"""FFNet through the project's API reproduces the vendored original (fixtures; logits reach 1e8 under the
reference weights, the pass rule scales with each array), with the original checkpoint layout; the fused
deploy form; the timm API; original names."""
from __future__ import annotations

import pytest
import torch
from timm.utils import reparameterize_model

import lowformer
from equivalence import assert_close_rule, case_input, fixture
from featured_api import assert_aliases, assert_odd_input_follows_strides, assert_params_and_macs, assert_timm_api
from featured_fixture import assert_reproduces_fixture, write_original_checkpoint
from lowformer.models.featured.ffnet import FFNet

TAPS = ("stage1", "stage2", "stage3", "stage4")


@pytest.fixture(scope="module")
def ffnet_1_file(tmp_path_factory):
    return write_original_checkpoint("ffnet_1", tmp_path_factory.mktemp("ffnet_1") / "checkpoint.pth")


def test_ffnet_1_reproduces_original(ffnet_1_file):
    assert_reproduces_fixture("ffnet_1", "ffnet_1", ffnet_1_file, TAPS)


def test_ffnet_2_reproduces_original(tmp_path):
    assert_reproduces_fixture("ffnet_2", "ffnet_2", write_original_checkpoint("ffnet_2", tmp_path / "c.pth"), TAPS)


def _count(model: torch.nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_reparameterized_model_is_smaller_and_reproduces_original(ffnet_1_file):
    """FFNet-1 has every foldable kind: Conv-BN (stem, token-mixer 1x1, channel-mixer 3x3), 7x7 + 3x3 pairs
    (stages 3-4 token mixers, stage entries) and the stage entries' BN -> 1x1 conv + identity."""
    model = lowformer.create_model("ffnet_1", checkpoint_path=ffnet_1_file).eval()
    deployed = reparameterize_model(model)
    # stem 2, per stage entry 2 + 1, per block 2 (stages 1-2) or 2 + 2 * 2 (stages 3-4), final norm 1
    assert _count(model, torch.nn.BatchNorm2d) == 2 + 3 * 3 + 4 * 2 + 10 * 6 + 1
    assert _count(deployed, torch.nn.BatchNorm2d) == 1  # the final norm, before pooling
    assert len(list(deployed.modules())) < len(list(model.modules()))
    assert sum(p.numel() for p in deployed.parameters()) < sum(p.numel() for p in model.parameters())
    case = fixture("ffnet_1")["cases"][1]
    x = torch.randn(1, 3, 75, 131, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_rule(deployed(case_input(case)), case["output"], what="deployed ffnet_1 output")
        expected = model(x)
        assert_close_rule(deployed(x), expected.tolist(), what="deployed ffnet_1 on 75x131")


def test_odd_non_square_input():
    assert_odd_input_follows_strides("ffnet_1", 97, 161, [80, 160, 320, 640])


def test_layer_scale_variants_build():
    """FFNet-3/4 crash in the original (a tensor assigned over the layer-scale parameter); here they build,
    with a (C,) layer scale per residual branch, initialised to 1e-6."""
    with torch.device("meta"):
        model = lowformer.create_model("ffnet_3")
    gammas = [p for n, p in model.named_parameters() if n.endswith((".ls1.gamma", ".ls2.gamma"))]
    assert len(gammas) == 2 * (4 + 4 + 22 + 5)
    assert [len(s.blocks) for s in model.stages] == [4, 4, 22, 5]


def test_drop_path_feature_info_and_classifier_reset():
    assert_timm_api("ffnet_1", 2 + 2 + 8 + 2, [80, 160, 320, 640])


def test_original_names_resolve():
    assert_aliases({f"ffnet{i}": f"ffnet_{i}" for i in range(1, 5)}, FFNet)


def test_params_and_macs_match_the_original():
    """The spec's count of the vendored original: 13.78 M params, 2.298 G MACs at 224."""
    assert_params_and_macs("ffnet1", 13_775_656, 2.298)
