"""EfficientMod through the project's API reproduces the vendored original (fixtures), with the original
checkpoint layout; any input size; the timm API (features, drop path, classifier reset); original names."""
from __future__ import annotations

import pytest
import torch

import lowformer
from featured_api import assert_aliases, assert_odd_input_follows_strides, assert_params_and_macs, assert_timm_api
from featured_fixture import assert_reproduces_fixture, write_original_checkpoint
from lowformer.models.featured.efficientmod import EfficientMod

TAPS = ("stage1", "stage2", "stage3", "stage4")


@pytest.mark.parametrize("variant", ["efficientmod_xxs", "efficientmod_xs"])
def test_reproduces_original(variant, tmp_path):
    path = write_original_checkpoint(variant, tmp_path / "checkpoint.pth")
    assert_reproduces_fixture(variant, variant, path, TAPS)


def test_odd_non_square_input():
    assert_odd_input_follows_strides("efficientmod_xxs", 97, 161, [32, 64, 128, 256])


def test_attention_heads_are_at_least_32_wide():
    with torch.device("meta"):
        model = lowformer.create_model("efficientmod_xxs")
    # stage 3 (width 128): 8 heads of 32 -> qkv 3 * 256; stage 4 (width 256): 8 heads of 32 -> 3 * 256
    assert model.stages[2].attn_blocks[0].attn.qkv.weight.shape == (768, 128)
    assert model.stages[3].attn_blocks[0].attn.proj.weight.shape == (256, 256)
    assert [len(s.blocks) for s in model.stages] == [2, 2, 6, 2]
    assert [len(s.attn_blocks) for s in model.stages] == [0, 0, 1, 2]


def test_drop_path_feature_info_and_classifier_reset():
    assert_timm_api("efficientmod_xs", 3 + 3 + 7 + 5, [32, 64, 144, 288])


def test_original_names_resolve():
    assert_aliases({"efficientmodxxs": "efficientmod_xxs", "efficientmodxs": "efficientmod_xs",
                    "efficientmods": "efficientmod_s", "efficientmods_Conv": "efficientmod_s_conv"}, EfficientMod)


def test_params_and_macs_match_the_original():
    """The spec's count of the vendored original: 6.63 M params, 0.773 G MACs at 224."""
    assert_params_and_macs("efficientmodxs", 6_627_544, 0.773)
