"""LowFormer through the project's API reproduces the original implementation (fixtures), with the
original checkpoint layouts, at every stride, on odd and non-square inputs."""
from __future__ import annotations

import math

import pytest
import timm
import torch

import lowformer
from equivalence import assert_close_rule, case_input, fixture, original_state_dict, pooled

VARIANTS = ["lowformer_b0", "lowformer_b1", "lowformer_b15", "lowformer_b3", "lowformer_e1", "lowformer_e2",
            "lowformer_e3"]
# Each variant's file is written in one of the layouts the original code produced.
LAYOUTS = {"lowformer_b0": "evalmodel", "lowformer_b1": "checkpoint", "lowformer_b15": "opseq",
           "lowformer_b3": "evalmodel", "lowformer_e1": "checkpoint", "lowformer_e2": "evalmodel",
           "lowformer_e3": "opseq"}
GETTERS = {"lowformer_b0": "get_lowformer_b0", "lowformer_b1": "get_lowformer_b1",
           "lowformer_b15": "get_lowformer_b15", "lowformer_b3": "get_lowformer_b3",
           "lowformer_e1": "get_lowformer_E1", "lowformer_e2": "get_lowformer_E2", "lowformer_e3": "get_lowformer_E3"}
# The papers' MACs under the B-series convention, from the LowFormer spec's verification table (M).
PAPER_MACS = {"lowformer_b0": 944.0, "lowformer_b1": 1411.0, "lowformer_b15": 2573.7, "lowformer_b3": 6098.7,
              "lowformer_e1": 1348.2, "lowformer_e2": 3789.3, "lowformer_e3": 4865.6}


def write_original(variant: str, path, layout: str) -> None:
    """Save the reference weights the way the original repository saved them."""
    sd = original_state_dict(variant)
    if layout == "evalmodel":
        torch.save(sd, path)
    elif layout == "checkpoint":
        # training checkpoints wrap the raw network and carry optimizer state and an EMA copy
        torch.save({"state_dict": sd, "epoch": 12, "best_val": 61.5, "optimizer": {"state": {}, "param_groups": []},
                    "ema": {0.9998: sd}, "scaler": None}, path)
    elif layout == "opseq":
        # the TorchScript-friendly head of the old codebase added an `opseq` level
        torch.save({k.replace("head.", "head.opseq.", 1): v for k, v in sd.items()}, path)


@pytest.fixture(scope="module", params=VARIANTS)
def loaded(request, tmp_path_factory):
    variant = request.param
    path = tmp_path_factory.mktemp(variant) / f"{LAYOUTS[variant]}.pt"
    write_original(variant, path, LAYOUTS[variant])
    return variant, path


def test_reproduces_original(loaded):
    variant, path = loaded
    expected = fixture(variant)
    model = lowformer.create_model(variant, checkpoint_path=path).eval()
    features = lowformer.create_model(variant, checkpoint_path=path, features_only=True, stride2_feature=True,
                                      out_indices=(0, 1, 2, 3, 4)).eval()
    assert sum(p.numel() for p in model.parameters()) == expected["params"]
    assert len(features.feature_info) == len(expected["cases"][0]["features"])
    for case in expected["cases"]:
        x = case_input(case)
        with torch.no_grad():
            out = model(x)
            maps = features(x)
        assert_close_rule(out, case["output"], what=f"{variant} output")
        assert [list(m.shape) for m in maps] == list(case["features"].values())
        assert_close_rule(pooled(maps[-1]), case["pooled_final"], what=f"{variant} pooled_final")
        for (name, exp), m in zip(case["pooled_stages"].items(), maps):
            assert_close_rule(pooled(m), exp, what=f"{variant} {name}")


def test_feature_info_describes_maps(loaded):
    variant, _ = loaded
    assert lowformer.create_model(variant, features_only=True).feature_info.reduction() == [4, 8, 16, 32]
    model = lowformer.create_model(variant, features_only=True, stride2_feature=True, out_indices=(0, 1, 2, 3, 4))
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    maps = model(torch.randn(1, 3, 193, 161))
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    # every stride-2 layer is 3x3 with padding 1: sizes follow repeated ceil(x / 2)
    h, w = 193, 161
    for m in maps:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        assert tuple(m.shape[2:]) == (h, w)


def test_standalone_getter_takes_checkpoint_path(loaded):
    variant, path = loaded
    model = getattr(lowformer, GETTERS[variant])(pretrained=str(path)).eval()
    case = fixture(variant)["cases"][1]
    with torch.no_grad():
        assert_close_rule(model(case_input(case)), case["output"], what=f"{GETTERS[variant]} output")


@pytest.mark.parametrize("variant", ["lowformer_b0", "lowformer_e3"])
def test_odd_non_square_input(variant):
    model = lowformer.create_model(variant).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 193, 161))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


def test_reproduces_original_on_unseen_input_through_timm_reference(tmp_path):
    """Inputs outside the fixtures: our loading path agrees with timm's own loader of the original file."""
    path = tmp_path / "evalmodel.pt"
    write_original("lowformer_b1", path, "evalmodel")
    ours = lowformer.create_model("lowformer_b1", checkpoint_path=path).eval()
    ref = timm.create_model("lowformer_b1").eval()
    sd = timm.models.lowformer.checkpoint_filter_fn(torch.load(path, weights_only=True), ref)
    ref.load_state_dict(sd)
    x = torch.randn(1, 3, 250, 190, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("variant", VARIANTS)
def test_macs_match_paper_convention(variant):
    from lowformer.bench import model_complexity
    info = model_complexity(variant)
    assert info["image_size"] == 224
    assert round(info["macs"] / 1e6, 1) == PAPER_MACS[variant]
    assert info["params"] == fixture(variant)["params"]
