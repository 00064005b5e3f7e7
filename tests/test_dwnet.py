"""DWNet (static, per-image dynamic, per-pixel dynamic) through the project's API reproduces the original:
the fixtures, loaded from files in the original training-checkpoint layout (yacs config included), and
inputs outside the fixtures, non-square ones included, against the original written from the spec."""
from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
import torch.fx
import torch.nn.functional as F

import lowformer
from equivalence import assert_close_rule, case_input, fixture, original_state_dict, pooled
from lowformer.models.dwnet import DWNET_MODELS, DynamicDWConv2d, InhomogeneousDWConv2d, checkpoint_filter_fn

TINY = ["dwnet_tiny", "dynamic_dwnet_tiny", "i_dynamic_dwnet_tiny"]
PARAMS_M = {"dwnet_tiny": 24.2, "dwnet_base": 74.3, "dynamic_dwnet_tiny": 51.1, "dynamic_dwnet_base": 161.6,
            "i_dynamic_dwnet_tiny": 26.2, "i_dynamic_dwnet_base": 80.3}
FEATURE_NAMES = ["patch_embed", "stage0", "stage1", "stage2", "stage3", "stage_final"]


@contextlib.contextmanager
def fake_yacs():
    """A stand-in ``yacs.config.CfgNode`` importable while saving, so the file pickles it by that name."""
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config.CfgNode, yacs.config = CfgNode, config
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "yacs", yacs)
        mp.setitem(sys.modules, "yacs.config", config)
        yield CfgNode


def write_original(variant: str, path) -> None:
    """Save the reference weights as the original training script saved checkpoints."""
    expected = fixture(variant)
    state_dict = original_state_dict(variant, weight_scale=expected.get("weight_scale"))
    with fake_yacs() as CfgNode:
        config = CfgNode(MODEL=CfgNode(TYPE="dwnet", NAME=expected["config"], NUM_CLASSES=1000, DROP_PATH_RATE=0.2),
                         DATA=CfgNode(IMG_SIZE=224, INTERPOLATION="bicubic"), TRAIN=CfgNode(EPOCHS=300))
        config.__dict__.update(__immutable__=True, __new_allowed__=False)
        torch.save({"model": state_dict, "optimizer": {"state": {}, "param_groups": [{"lr": 5e-6, "params": [0]}]},
                    "lr_scheduler": {"last_epoch": 300}, "max_accuracy": 81.2, "epoch": 299, "config": config}, path)


@pytest.fixture(scope="module")
def loaded(request, tmp_path_factory):
    variant = request.param
    path = tmp_path_factory.mktemp(variant) / f"{variant}_224.pth"
    write_original(variant, path)
    return variant, path, lowformer.create_model(variant, checkpoint_path=path).eval()


def run_with_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of the public forward, plus the maps the fixtures name, caught on the way."""
    maps = []
    taps = [model.patch_embed, *model.stages, model.norm]
    handles = [m.register_forward_hook(lambda mod, args, out: maps.append(out)) for m in taps]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, maps


def check_case(variant: str, model: torch.nn.Module, case: dict) -> None:
    out, maps = run_with_features(model, case_input(case))
    assert_close_rule(out, case["output"], what=f"{variant} output")
    assert list(case["features"]) == FEATURE_NAMES
    assert [list(m.shape) for m in maps] == list(case["features"].values())
    assert_close_rule(pooled(maps[-1]), case["pooled_final"], what=f"{variant} pooled_final")
    for name, m in zip(FEATURE_NAMES, maps):
        assert_close_rule(pooled(m), case["pooled_stages"][name], what=f"{variant} {name}")


@pytest.mark.parametrize("loaded", DWNET_MODELS, indirect=True)
def test_reproduces_original(loaded):
    variant, _, model = loaded
    expected = fixture(variant)
    params = sum(p.numel() for p in model.parameters())
    assert params == expected["params"] and round(params / 1e6, 1) == PARAMS_M[variant]
    for case in expected["cases"]:
        check_case(variant, model, case)


@pytest.mark.parametrize("variant", DWNET_MODELS)
def test_feature_maps_one_per_stride(variant):
    with torch.device("meta"):
        model = lowformer.create_model(variant, features_only=True).eval()
        assert model.feature_info.reduction() == [4, 8, 16, 32]
        case = fixture(variant)["cases"][1]  # the classifier's own maps are checked at every case above
        maps = model(torch.empty(1, 3, 256, 256))
        assert [list(m.shape) for m in maps] == [case["features"][f"stage{s}"] for s in range(4)]
        maps = model(torch.empty(1, 3, 224, 160))
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    assert [tuple(m.shape[2:]) for m in maps] == [(56, 40), (28, 20), (14, 10), (7, 5)]


@pytest.mark.parametrize("loaded", ["dwnet_tiny"], indirect=True)
def test_features_only_loads_original_file(loaded):
    """features_only with an original file: the maps are the (fixture-checked) classifier's stage outputs."""
    variant, path, model = loaded
    features = lowformer.create_model(variant, checkpoint_path=path, features_only=True, out_indices=(1, 3)).eval()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        maps = features(x)
        _, expected = model.forward_intermediates(x, indices=(1, 3))
    assert features.feature_info.channels() == [192, 768] and features.feature_info.reduction() == [8, 32]
    for m, e in zip(maps, expected):
        torch.testing.assert_close(m, e)


def original_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, group_channels=None) -> torch.Tensor:
    """The original classifier written from the spec, independently of ours: its key names, its token
    layout (B, H*W, C), nn.Linear MLPs, per-image kernels applied one image at a time, per-pixel kernels
    as the literal sum over an unfolded input."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                            False, 0., 1e-5)

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + "weight"], sd[p + "bias"], 1e-5)

    def spatial(t, p, stage):
        if p + "weight" in sd:  # static depth-wise conv
            return F.conv2d(t, sd[p + "weight"], sd[p + "bias"], padding=3, groups=t.shape[1])
        B, d, H, W = t.shape
        if p + "conv1.weight" in sd:  # per-image kernels
            outs = []
            for b in range(B):
                g = F.relu(bn(F.conv2d(t[b:b + 1].mean((2, 3), keepdim=True), sd[p + "conv1.weight"]), p + "bn."))
                kernel = F.conv2d(g, sd[p + "conv2.weight"], sd[p + "conv2.bias"]).reshape(d, 1, 7, 7)
                outs.append(F.conv2d(t[b:b + 1], kernel, sd[p + "bias"], padding=3, groups=d))
            return torch.cat(outs)
        gc = group_channels[stage]
        g = F.relu(bn(F.conv2d(t, sd[p + "conv1.0.weight"], sd[p + "conv1.0.bias"]), p + "conv1.1."))
        kernel = F.conv2d(g, sd[p + "conv2.0.weight"], sd[p + "conv2.0.bias"]).reshape(B, d // gc, 1, 49, H * W)
        cols = F.unfold(t, 7, padding=3).reshape(B, d // gc, gc, 49, H * W)
        return (cols * kernel).sum(3).reshape(B, d, H, W)

    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    B, _, H, W = x.shape
    x = ln(x.flatten(2).transpose(1, 2), "patch_embed.norm.")
    for i in range(4):
        j = 0
        while f"layers.{i}.blocks.{j}.bn.weight" in sd:
            p, d = f"layers.{i}.blocks.{j}.", x.shape[-1]
            t = x.transpose(1, 2).reshape(B, d, H, W)
            y = F.relu(bn(F.conv2d(t, sd[p + "attn2conv.conv0.weight"]), p + "attn2conv.bn0."))
            y = F.relu(bn(spatial(y, p + "attn2conv.conv.", i), p + "attn2conv.bn."))
            y = bn(F.conv2d(y, sd[p + "attn2conv.conv2.weight"]), p + "attn2conv.bn2.")
            t = t + y
            z = bn(t, p + "bn.").flatten(2).transpose(1, 2)
            z = F.linear(F.gelu(F.linear(z, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
            x = t.flatten(2).transpose(1, 2) + z
            j += 1
        if i < 3:
            p, v = f"layers.{i}.downsample.", x.reshape(B, H, W, -1)
            v = torch.cat([v[:, 0::2, 0::2], v[:, 1::2, 0::2], v[:, 0::2, 1::2], v[:, 1::2, 1::2]], -1)
            H, W = H // 2, W // 2
            x = F.linear(ln(v.reshape(B, H * W, -1), p + "norm."), sd[p + "reduction.weight"])
    return F.linear(ln(x, "norm.").mean(1), sd["head.weight"], sd["head.bias"])


GROUP_CHANNELS = {"dwnet_tiny": None, "dynamic_dwnet_tiny": None, "i_dynamic_dwnet_tiny": (3, 6, 12, 24)}


@pytest.mark.parametrize("loaded", TINY, indirect=True)
def test_spec_reference_reproduces_fixture(loaded):
    """The reference below is itself the original: it reproduces the fixture from the original file."""
    variant, path, _ = loaded
    case = fixture(variant)["cases"][1]
    with torch.no_grad():
        out = original_forward(lowformer.read_checkpoint(path)["model"], case_input(case), GROUP_CHANNELS[variant])
    assert_close_rule(out, case["output"], what=f"{variant} spec reference")


@pytest.mark.parametrize("loaded", TINY, indirect=True)
def test_non_square_input_matches_original(loaded):
    """A size outside the fixtures, not square (224x160): ours equals the original written from the spec."""
    variant, path, model = loaded
    x = torch.randn(1, 3, 224, 160, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = original_forward(lowformer.read_checkpoint(path)["model"], x, GROUP_CHANNELS[variant])
        out = model(x)
    assert out.shape == (1, 1000)
    assert_close_rule(out, expected.tolist(), what=f"{variant} 224x160")


@pytest.mark.parametrize("loaded,generator", [("dynamic_dwnet_tiny", "mixer.dw.expand.weight"),
                                              ("i_dynamic_dwnet_tiny", "mixer.dw.reduce.conv.weight")],
                         indirect=["loaded"])
def test_dynamic_models_are_dynamic(loaded, generator):
    """Changing only the kernel-generating weights changes the output (the original's newest commit
    silently builds these models static, so their generators would do nothing)."""
    variant, _, model = loaded
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    params = [p for name, p in model.named_parameters() if name.endswith(generator)]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            before = model(x)
            for p in params:
                p.mul_(1.5)
            after = model(x)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    assert len(params) == 12
    assert (after - before).abs().max() > 1e-3 * before.abs().max()


def _set_generator_weight_to_zero(op: torch.nn.Module) -> None:
    with torch.no_grad():
        op.expand.weight.zero_()
        op.expand.bias.normal_()


def test_per_image_kernels_depend_on_each_image_alone():
    torch.manual_seed(0)
    op = DynamicDWConv2d(8).eval()
    with torch.no_grad():
        op.bias.normal_()
        a, b = torch.randn(1, 8, 9, 14), 3 * torch.randn(1, 8, 9, 14)
        both = op(torch.cat([a, b]))
        torch.testing.assert_close(both, torch.cat([op(a), op(b)]))
        kernels = [op.expand(op.reduce(t.mean((2, 3), keepdim=True))).reshape(8, 1, 7, 7) for t in (a, b)]
        torch.testing.assert_close(both[1:], F.conv2d(b, kernels[1], op.bias, padding=3, groups=8))
        assert not torch.allclose(both[1:], F.conv2d(b, kernels[0], op.bias, padding=3, groups=8))
        # without its input-dependent part the operator is a static depth-wise conv with the generator's bias
        _set_generator_weight_to_zero(op)
        torch.testing.assert_close(op(b), F.conv2d(b, op.expand.bias.reshape(8, 1, 7, 7), op.bias, padding=3, groups=8))


def test_per_pixel_kernels_are_shared_by_consecutive_channels():
    torch.manual_seed(0)
    op = InhomogeneousDWConv2d(12, group_channels=3).eval()
    x = torch.randn(2, 12, 10, 7)
    with torch.no_grad():
        _set_generator_weight_to_zero(op)  # every pixel gets its group's constant kernel
        kernel = op.expand.bias.reshape(4, 1, 7, 7).repeat_interleave(3, dim=0)
        torch.testing.assert_close(op(x), F.conv2d(x, kernel, padding=3, groups=12))


def test_dynamic_model_trains():
    torch.manual_seed(0)
    model = lowformer.create_model("i_dynamic_dwnet_tiny", num_classes=5, drop_path_rate=0.1).train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    for block in (model.stages[0].blocks[0], model.stages[3].blocks[1]):
        assert block.mixer.dw.expand.weight.grad.abs().sum() > 0


def test_drop_path_reset_classifier_and_eval_preprocessing():
    with torch.device("meta"):
        model = lowformer.create_model("dwnet_base", drop_path_rate=0.5, num_classes=10).eval()
        blocks = [b for s in model.stages for b in s.blocks]
        assert isinstance(blocks[0].drop_path, torch.nn.Identity)
        assert [b.drop_path.drop_prob for b in blocks[1:]] == pytest.approx([0.5 * k / 23 for k in range(1, 24)])
        assert model(torch.empty(2, 3, 64, 64)).shape == (2, 10)
        model.reset_classifier(0)
        assert model(torch.empty(2, 3, 64, 64)).shape == (2, 1024)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("loaded", ["i_dynamic_dwnet_tiny"], indirect=True)
def test_checkpoint_filter_keeps_native_keys_and_lists_models(loaded):
    _, _, model = loaded
    assert lowformer.list_models("*dwnet*") == sorted(DWNET_MODELS)
    native = model.state_dict()
    assert checkpoint_filter_fn(native, model) is native


@pytest.mark.parametrize("loaded", ["dynamic_dwnet_tiny"], indirect=True)
def test_dynamic_file_does_not_load_into_static_model(loaded):
    """Where the original's loader (strict=False) silently keeps random 7x7 weights, loading fails loudly."""
    _, path, _ = loaded
    with pytest.raises(lowformer.CheckpointError) as e:
        lowformer.create_model("dwnet_tiny", checkpoint_path=path)
    assert "missing keys" in str(e.value) and "unexpected keys" in str(e.value)


@pytest.mark.parametrize("loaded", ["dynamic_dwnet_tiny", "i_dynamic_dwnet_tiny"], indirect=True)
def test_fx_traced_graph_matches_eager(loaded):
    """The dynamic operators trace with torch.fx (as deploy passes do) and the graph still follows the input size."""
    _, _, model = loaded
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x))
