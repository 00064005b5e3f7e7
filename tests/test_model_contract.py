"""timm's model API contract, the same checks for the smallest variant of every family in ``list_models()``."""
import copy
import functools

import pytest
import timm
import torch

import lowformer

# the smallest variant of every family; the heaviest run under the slow marker to keep CI short
_HEAVY = {"visformer_tiny", "dwnet_tiny", "dynamic_dwnet_tiny", "i_dynamic_dwnet_tiny", "inception_transformer_small"}
NAMES = ["lowformer_b0", "edgeformer_xs", "visformer_tiny", "visformer_tiny_v2", "dwnet_tiny",
         "dynamic_dwnet_tiny", "i_dynamic_dwnet_tiny", "efficientmod_xxs", "mobilevig_ti", "ffnet_1",
         "inception_transformer_small", "edgevit_xxs", "fat_b0"]
FAMILIES = [pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else n for n in NAMES]
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@functools.lru_cache(maxsize=None)
def _built(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return lowformer.create_model(name).eval()


def build(name: str) -> torch.nn.Module:
    """A fresh copy of the family's model (building some families once takes longer than every check)."""
    return copy.deepcopy(_built(name))


def test_every_family_is_listed():
    assert set(NAMES) <= set(lowformer.list_models())


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_intermediates_equals_forward_features_and_feature_info(name):
    model = build(name)
    with torch.no_grad():
        final, maps = model.forward_intermediates(X)
        torch.testing.assert_close(final, model.forward_features(X))
        assert [m.shape[1] for m in maps] == [f["num_chs"] for f in model.feature_info]
        assert [-(-64 // m.shape[-1]) for m in maps] == [f["reduction"] for f in model.feature_info]


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_and_lowformer_create_model_agree(name):
    a = build(name)
    torch.manual_seed(0)
    b = timm.create_model(name).eval()
    assert type(a) is type(b)
    with torch.no_grad():
        torch.testing.assert_close(a(X), b(X))


@pytest.mark.parametrize("name", FAMILIES)
def test_prune_keeping_the_head_still_runs(name):
    """prune_head=False after dropping stages: the head that lost its input goes too and forward still runs."""
    model = build(name)
    model.prune_intermediate_layers(indices=[1], prune_head=False)
    with torch.no_grad():
        out = model(X)
    assert out.shape[:2] == (2, model.feature_info[1]["num_chs"])


@pytest.mark.parametrize("name", FAMILIES)
def test_prune_with_head_keeps_the_wanted_maps(name):
    model = build(name)
    with torch.no_grad():
        expected = model.forward_intermediates(X, indices=[0, 1], intermediates_only=True)
    model.prune_intermediate_layers(indices=[0, 1])
    with torch.no_grad():
        for got, exp in zip(model.forward_intermediates(X, indices=[0, 1], intermediates_only=True), expected):
            torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("name", FAMILIES)
def test_reset_classifier_keeps_device_and_dtype(name):
    with torch.device("meta"):
        model = lowformer.create_model(name)
    model.reset_classifier(7)
    assert all(p.device.type == "meta" for p in model.get_classifier().parameters())
    model = build(name).to(torch.bfloat16)
    model.reset_classifier(7)
    assert all(p.dtype == torch.bfloat16 for p in model.get_classifier().parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_reset_classifier_without_pooling_keeps_the_map(name):
    """timm's test_models default_cfg check: after reset_classifier(0, '') the output is the 4-D map."""
    model = build(name)
    model.reset_classifier(0, "")
    with torch.no_grad():
        out = model(X)
    assert out.ndim == 4 and out.shape[1] == model.head_hidden_size  # LowFormer keeps its 1x1 head convs


@pytest.mark.parametrize("name", FAMILIES)
def test_features_only_matches_feature_info(name):
    model = build(name)
    features = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        maps = features(X)
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    taps = {f["module"]: f for f in model.feature_info}
    assert all(f["module"] in taps for f in features.feature_info.get_dicts())


@pytest.mark.parametrize("name", ["lowformer_b0", "edgeformer_xs", "visformer_tiny_v2", "dwnet_tiny", "fat_b0"])
def test_drop_path_and_gradient_checkpointing(name):
    torch.manual_seed(0)
    model = lowformer.create_model(name, drop_path_rate=0.1, num_classes=3).train()
    assert any(type(m).__name__ == "DropPath" for m in model.modules())
    torch.manual_seed(0)
    plain = lowformer.create_model(name, num_classes=3).eval()
    plain.set_grad_checkpointing(False)
    x = X.clone().requires_grad_(True)
    plain(x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    plain.set_grad_checkpointing(True)
    plain(x).sum().backward()
    torch.testing.assert_close(x.grad, grad)


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_reparameterize_model_works(name):
    """timm's walk calls any child attribute named ``fuse``; no project model may have such a submodule."""
    model = build(name)
    with torch.no_grad():
        expected = model(X)
        torch.testing.assert_close(timm.utils.reparameterize_model(model)(X), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_torchscript(name):
    model = build(name)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(X), model(X), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_fx_feature_extraction(name):
    """timm's test_models fx path: graph node names, then a feature extractor returning the last node."""
    from timm.models import create_feature_extractor, get_graph_node_names
    model = build(name)
    _, eval_nodes = get_graph_node_names(model)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]]).eval()
    with torch.no_grad():
        torch.testing.assert_close(next(iter(fx_model(X).values())), model(X), rtol=1e-4, atol=1e-4)
