"""Backbones ready for dense prediction: any detection size in train and eval, features at strides 4-32 from
both create_model entry points, output_stride, and Visformer's windowed attention against a hand computation."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import lowformer
from lowformer.models._dense import OutputStrideError
from lowformer.models.visformer_v2 import add_pos_embed, window_partition, window_reverse

# the smallest variant of every family; the heaviest run under the slow marker to keep CI short
_HEAVY = {"dwnet_tiny", "dynamic_dwnet_tiny", "i_dynamic_dwnet_tiny", "inception_transformer_small"}
NAMES = ["lowformer_b0", "edgeformer_xs", "visformer_tiny", "visformer_tiny_v2", "dwnet_tiny",
            "dynamic_dwnet_tiny", "i_dynamic_dwnet_tiny", "efficientmod_xxs", "mobilevig_ti", "ffnet_1",
            "inception_transformer_small", "edgevit_xxs", "fat_b0"]
FAMILIES = [pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else n for n in NAMES]
STRIDE2 = ["lowformer_b0", "edgeformer_xs", "visformer_tiny", "visformer_tiny_v2"]
DILATABLE = ["lowformer_b0", "edgeformer_xs", "dwnet_tiny",
             pytest.param("dynamic_dwnet_tiny", marks=pytest.mark.slow),
             pytest.param("i_dynamic_dwnet_tiny", marks=pytest.mark.slow)]
WINDOWED = {"visformer_tiny": dict(window_size=(14, 7)), "visformer_tiny_v2": dict(window_size=(14, 7))}


def _train_and_eval(name: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = lowformer.create_model(name, num_classes=5, **WINDOWED.get(name, {}))
    x = torch.randn(2, 3, *size)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape[-2:]) for m in maps] == [(-(-size[0] // f["reduction"]), -(-size[1] // f["reduction"]))
                                                  for f in model.feature_info]


@pytest.mark.parametrize("name", FAMILIES)
def test_any_detection_size_trains_and_evaluates(name):
    _train_and_eval(name, (192, 256))


@pytest.mark.slow
@pytest.mark.parametrize("size", [(512, 512), (480, 640), (800, 1216)])
@pytest.mark.parametrize("name", NAMES)
def test_detection_sizes_train_and_evaluate(name, size):
    _train_and_eval(name, size)


@pytest.mark.parametrize("name", FAMILIES)
def test_features_default_to_strides_4_to_32_from_both_entry_points(name):
    x = torch.randn(1, 3, 128, 160)
    torch.manual_seed(0)
    ours = lowformer.create_model(name, features_only=True).eval()
    torch.manual_seed(0)
    theirs = timm.create_model(name, features_only=True).eval()
    expected = [8, 16, 32] if name == "visformer_tiny" else [4, 8, 16, 32]  # V1 has no stride-4 map
    assert ours.feature_info.reduction() == theirs.feature_info.reduction() == expected
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert [m.shape[1] for m in a] == ours.feature_info.channels()
    for m, n, r in zip(a, b, expected):
        assert m.shape[-2:] == (128 // r, 160 // r)
        torch.testing.assert_close(m, n)


@pytest.mark.parametrize("name", STRIDE2)
def test_stride2_map_through_out_indices(name):
    model = lowformer.create_model(name, features_only=True, stride2_feature=True).eval()
    assert model.feature_info.reduction()[0] != 2  # the default still starts at stride 4 (8 for V1)
    full = lowformer.create_model(name, features_only=True, stride2_feature=True,
                                  out_indices=tuple(range(len(model.feature_info.reduction()) + 1))).eval()
    full.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        maps, rest = full(x), model(x)
    assert full.feature_info.reduction()[0] == 2 and maps[0].shape[-2:] == (48, 64)
    for m, n in zip(maps[1:], rest):
        torch.testing.assert_close(m, n)


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("name", DILATABLE)
def test_output_stride_dilates_the_last_stages(name, output_stride):
    plain = timm.create_model(name).eval()
    model = timm.create_model(name, features_only=True, output_stride=output_stride).eval()
    reductions = model.feature_info.reduction()
    assert reductions == [min(r, output_stride) for r in (4, 8, 16, 32)]
    # same parameters: a classifier's weights load into the dilated backbone
    missing, _ = model.model.load_state_dict(plain.state_dict(), strict=False)
    assert not missing
    with torch.no_grad():
        maps = model(torch.randn(2, 3, 128, 96))
    assert [tuple(m.shape[-2:]) for m in maps] == [(128 // r, 96 // r) for r in reductions]


def test_output_stride_16_in_smp_deeplabv3():
    smp = pytest.importorskip("segmentation_models_pytorch")
    net = smp.DeepLabV3(encoder_name="tu-lowformer_b0", encoder_weights=None, encoder_output_stride=16,
                        classes=3).eval()
    assert net.encoder.model.feature_info.reduction() == [4, 8, 16, 16]
    with torch.no_grad():
        assert net(torch.randn(1, 3, 160, 224)).shape == (1, 3, 160, 224)


@pytest.mark.parametrize("name", ["visformer_tiny_v2", "efficientmod_xxs", "fat_b0", "edgevit_xxs"])
def test_output_stride_refused_in_one_line_naming_the_family(name):
    with pytest.raises(OutputStrideError, match=r"cannot run at output_stride=16") as info:
        lowformer.create_model(name, output_stride=16)
    assert "\n" not in str(info.value)


def _reference_window_block(x, block, window, shift, qk_scale_mult, rel_bias):
    """One attention branch computed window by window with explicit padding, roll and masking regions."""
    y = block.norm1(x)
    B, C, H, W = y.shape
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    y = F.pad(y, (0, Wp - W, 0, Hp - H))
    region = torch.zeros(Hp, Wp, dtype=torch.long)
    if shift:
        y = torch.roll(y, (-shift, -shift), (2, 3))
        for i, hs in enumerate((slice(0, Hp - window), slice(Hp - window, Hp - shift), slice(Hp - shift, Hp))):
            for j, ws in enumerate((slice(0, Wp - window), slice(Wp - window, Wp - shift), slice(Wp - shift, Wp))):
                region[hs, ws] = 3 * i + j
    attn = block.attn
    heads, hd = attn.num_heads, attn.head_dim
    out = torch.zeros(B, heads * hd, Hp, Wp)
    for r in range(0, Hp, window):
        for c in range(0, Wp, window):
            win = y[:, :, r:r + window, c:c + window]
            qkv = attn.qkv(win).flatten(2).view(B, 3, heads, hd, -1)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B, heads, hd, N)
            logits = torch.einsum("bhdn,bhdm->bhnm", q * qk_scale_mult, k * qk_scale_mult)
            if rel_bias is not None:
                logits = logits + rel_bias
            reg = region[r:r + window, c:c + window].flatten()
            logits = logits.masked_fill((reg[:, None] != reg[None, :])[None, None], float("-inf")) if shift else logits
            o = torch.einsum("bhnm,bhdm->bhdn", logits.softmax(-1), v)
            out[:, :, r:r + window, c:c + window] = o.reshape(B, heads * hd, window, window)
    out = attn.proj(out)
    if shift:
        out = torch.roll(out, (shift, shift), (2, 3))
    return out[:, :, :H, :W]


@pytest.mark.parametrize("size", [(512, 512), (480, 640)])
@pytest.mark.parametrize("name", ["visformer_tiny", "visformer_tiny_v2"])
def test_windowed_attention_matches_hand_computation(name, size):
    """Every attention block at strides 16 and 32 (shifted and not) equals the window-by-window computation,
    and the position embeddings at this size are timm's resampling of the stored ones."""
    torch.manual_seed(0)
    model = lowformer.create_model(name, window_size=(14, 7)).eval()
    v2 = name == "visformer_tiny_v2"
    for stage, window, stride in ((model.stage2, 14, 16), (model.stage3, 7, 32)):
        shifts = []
        for block in stage:
            x = torch.randn(1, block.norm2.num_features, size[0] // stride, size[1] // stride)
            shift = block.shift_size if v2 else block.attn.shift_size
            shifts.append(shift)
            if v2:
                scale, bias = block.attn.head_dim ** block.attn.qk_scale, block.attn._relative_position_bias()[0]
            else:
                scale, bias = block.attn.scale ** 0.5, None
            with torch.no_grad():
                y = x + _reference_window_block(x, block, window, shift, scale, bias)
                expected = y + block.mlp(block.norm2(y))
                torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-4)
        assert {shifts[0], shifts[1]} == {0, window // 2}
    pos = model.pos_embed2 if v2 else model.pos_embed2
    h, w = size[0] // 16, size[1] // 16
    with torch.no_grad():
        got = add_pos_embed(torch.zeros(1, pos.shape[1], h, w), pos)
        tokens = resample_abs_pos_embed(pos.flatten(2).transpose(1, 2), new_size=[h, w],
                                        old_size=list(pos.shape[-2:]), num_prefix_tokens=0)
    torch.testing.assert_close(got, tokens.transpose(1, 2).reshape(1, -1, h, w))


def test_window_partition_round_trip():
    x = torch.randn(2, 3, 28, 42)
    parts = window_partition(x, 14)
    assert parts.shape == (12, 3, 14, 14)
    torch.testing.assert_close(parts[1], x[0, :, :14, 14:28])
    torch.testing.assert_close(window_reverse(parts, 14, 28, 42), x)
