"""MobileViG through the project's API reproduces the vendored original (fixtures), with the original
checkpoint layout; the graph aggregation on non-square maps; the timm API; original names."""
from __future__ import annotations

import pytest
import torch

import lowformer
from featured_api import assert_aliases, assert_odd_input_follows_strides, assert_params_and_macs, assert_timm_api
from featured_fixture import assert_reproduces_fixture, write_original_checkpoint
from lowformer.models.featured.mobilevig import MaxRelative, MobileViG, checkpoint_filter_fn

TAPS = ("stage1", "stage2", "stage3", "stage4")


@pytest.mark.parametrize("variant", ["mobilevig_ti", "mobilevig_m"])
def test_reproduces_original(variant, tmp_path):
    path = write_original_checkpoint(variant, tmp_path / "checkpoint.pth")
    assert_reproduces_fixture(variant, variant, path, TAPS)


def test_max_relative_on_a_non_square_map():
    """Spelled out element by element: hops 2, 4, ... below each side, the copy shifted toward higher
    indices (x[i - s] at position i, cyclic), maximum of x - shifted and of zero."""
    x = torch.randn(1, 2, 5, 7, generator=torch.Generator().manual_seed(3))
    expected = torch.zeros_like(x)
    _, _, h, w = x.shape
    for i in range(h):
        for j in range(w):
            diffs = [x[..., i, j] - x[..., (i - s) % h, j] for s in range(2, h, 2)]
            diffs += [x[..., i, j] - x[..., i, (j - s) % w] for s in range(2, w, 2)]
            expected[..., i, j] = torch.stack(diffs + [torch.zeros_like(diffs[0])]).amax(0)
    torch.testing.assert_close(MaxRelative(2)(x), expected)


def test_odd_non_square_input():
    assert_odd_input_follows_strides("mobilevig_ti", 161, 97, [42, 84, 168, 256])


def test_distillation_head_is_merged_into_the_classifier():
    """Checkpoints trained with distillation carry `dist_head`; the original averages both heads at eval."""
    with torch.device("meta"):
        model = lowformer.create_model("mobilevig_ti")
    head_w, dist_w = torch.randn(1000, 512, 1, 1), torch.randn(1000, 512, 1, 1)
    head_b, dist_b = torch.randn(1000), torch.randn(1000)
    out = checkpoint_filter_fn({"head.weight": head_w, "head.bias": head_b, "dist_head.weight": dist_w,
                                "dist_head.bias": dist_b}, model)
    assert set(out) == {"head.weight", "head.bias"}
    torch.testing.assert_close(out["head.weight"], ((head_w + dist_w) / 2).reshape(1000, 512))
    torch.testing.assert_close(out["head.bias"], (head_b + dist_b) / 2)


def test_drop_path_feature_info_and_classifier_reset():
    assert_timm_api("mobilevig_m", 3 + 3 + 9 + 3, [42, 84, 224, 400])
    with torch.device("meta"):
        model = lowformer.create_model("mobilevig_m", num_classes=10)
    assert model.get_classifier().in_features == 768  # after the head's 1x1 conv


def test_pruned_to_an_early_stage_still_runs():
    with torch.device("meta"):
        model = lowformer.create_model("mobilevig_ti")
        assert model.prune_intermediate_layers(indices=(1, 2)) == [1, 2]
        final, maps = model.forward_intermediates(torch.zeros(1, 3, 64, 96), indices=(1, 2))
        pooled = model.forward_head(final)
    assert [tuple(m.shape) for m in maps] == [(1, 84, 8, 12), (1, 168, 4, 6)]
    assert pooled.shape == (1, 168)


def test_original_names_resolve():
    assert_aliases({"mobilevigti": "mobilevig_ti", "mobilevigs": "mobilevig_s", "mobilevigm": "mobilevig_m",
                    "mobilevigb": "mobilevig_b"}, MobileViG)


def test_params_and_macs_match_the_original():
    """The spec's count of the vendored original: 13.31 M params, 1.493 G MACs at 224."""
    assert_params_and_macs("mobilevigm", 13_306_786, 1.493)
