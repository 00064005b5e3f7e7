"""Shared checks of the timm API of a featured family (any input size, features, drop path, classifier reset,
original names), so each family's test file states only its numbers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx
from timm.layers._fx import get_notrace_modules

import lowformer


def assert_odd_input_follows_strides(name: str, height: int, width: int, channels: list[int]) -> None:
    """Every stride-2 step of these families pads to round up: stage i is ceil(side / (4 * 2**i)). The graph
    torch.fx traces (timm's no-trace modules as leaves, as a deploy pass traces it) computes the same."""
    model = lowformer.create_model(name).eval()
    x = torch.randn(1, 3, height, width)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        out = model.forward_head(final)
        traced = torch.fx.GraphModule(model, _LeafTracer().trace(model))
        torch.testing.assert_close(traced(x), out)
    sizes = [(math.ceil(height / 4 / 2 ** i), math.ceil(width / 4 / 2 ** i)) for i in range(4)]
    assert [tuple(m.shape[2:]) for m in maps] == sizes
    assert [m.shape[1] for m in maps] == channels
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, tuple(get_notrace_modules())) or super().is_leaf_module(m, qualname)


def assert_timm_api(name: str, blocks: int, channels: list[int]) -> None:
    """drop_path_rate rises linearly from 0 over ``blocks`` blocks (one rate per block, the first is 0 and
    gets no module); features_only gives one map per stride; reset_classifier replaces the head."""
    with torch.device("meta"):
        model = lowformer.create_model(name, drop_path_rate=0.1)
        features = lowformer.create_model(name, features_only=True)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert len(set(rates)) == blocks - 1 and rates == sorted(rates) and max(rates) == pytest.approx(0.1)
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert features.feature_info.channels() == channels
    model.reset_classifier(10)
    assert model.get_classifier().out_features == 10
    assert model(torch.zeros(2, 3, 64, 96, device="meta")).shape == (2, 10)


def assert_aliases(aliases: dict[str, str], model_cls: type) -> None:
    """The original benchmark's names resolve, and create_model builds the registered variant from one."""
    for alias, name in aliases.items():
        assert lowformer.models.resolve_model_name(alias) == name
    alias, name = next(iter(aliases.items()))
    with torch.device("meta"):
        model = lowformer.create_model(alias)
    assert isinstance(model, model_cls) and model.pretrained_cfg["architecture"] == name


def assert_params_and_macs(alias: str, params: int, giga_macs: float) -> None:
    """Params exactly and MACs (3 decimals, in G) at 224 as the spec counted the vendored original."""
    from lowformer.bench import model_complexity
    info = model_complexity(alias)
    assert info["params"] == params and info["image_size"] == 224
    assert round(info["macs"] / 1e9, 3) == giga_macs
