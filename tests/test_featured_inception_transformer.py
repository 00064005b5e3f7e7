"""The Inception Transformer through the project's API reproduces the original (fixtures) from a checkpoint
in the original layout; the position-table resizing, which the fixtures barely see, is checked directly."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowformer
from featured_fixture import assert_reproduces_fixture, write_original_checkpoint
from lowformer.models.featured.inception_transformer import (
    InceptionTransformerStage,
    LowMixer,
    checkpoint_filter_fn,
    resize_pos_table,
)


@pytest.mark.parametrize("name,variant", [("iformers", "inception_transformer_small"),
                                          ("inception_transformer_base", "inception_transformer_base")])
def test_reproduces_original(name, variant, tmp_path):
    path = write_original_checkpoint(variant, tmp_path / "iformer.pth")
    assert_reproduces_fixture(name, variant, path, ["stage1", "stage2", "stage3", "stage4"])


def test_position_table_resize_is_bilinear_without_corner_alignment():
    # a 2x2 table [[0, 1], [2, 3]] on a 4x4 grid: with align_corners=False the sample points of the
    # new grid fall at -0.25, 0.25, 0.75, 1.25 of the old one (clamped at the borders)
    table = torch.tensor([[0., 1.], [2., 3.]]).reshape(1, 2, 2, 1)
    a = torch.tensor([0., 0.25, 0.75, 1.])
    by_hand = (2 * a[:, None] + a[None, :]).reshape(1, 4, 4, 1)
    torch.testing.assert_close(resize_pos_table(table, (4, 4)), by_hand)

    # a table with structure in every direction, resized to a non-square grid, against F.interpolate
    known = torch.arange(7 * 5 * 3, dtype=torch.float32).reshape(1, 7, 5, 3).sin()
    reference = F.interpolate(known.permute(0, 3, 1, 2), size=(9, 4), mode="bilinear",
                              align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(resize_pos_table(known, (9, 4)), reference)
    for other in (dict(mode="bilinear", align_corners=True), dict(mode="bicubic", align_corners=False),
                  dict(mode="bilinear", align_corners=False, antialias=True)):
        wrong = F.interpolate(known.permute(0, 3, 1, 2), size=(4, 3), **other).permute(0, 2, 3, 1)
        assert not torch.allclose(resize_pos_table(known, (4, 3)), wrong, atol=1e-3)
    assert resize_pos_table(known, (7, 5)) is known


def test_stage_adds_its_table_resized_to_the_map():
    stage = InceptionTransformerStage(nn.Identity(), dim=1, grid_size=(2, 2), blocks=[])
    with torch.no_grad():
        stage.pos_embed.copy_(torch.tensor([[0., 1.], [2., 3.]]).reshape(1, 2, 2, 1))
        out = stage(torch.zeros(1, 1, 4, 4))
    a = torch.tensor([0., 0.25, 0.75, 1.])
    torch.testing.assert_close(out, (2 * a[:, None] + a[None, :]).reshape(1, 1, 4, 4))


def test_checkpoint_for_another_grid_gets_its_tables_resized():
    # a 224 checkpoint into the _384 model: the original's table names, resized by the same rule
    with torch.device("meta"):
        model = lowformer.create_model("inception_transformer_small_384")
    tables = {f"pos_embed{i + 1}": torch.randn(1, 56 // 2 ** i, 56 // 2 ** i, c)
              for i, c in enumerate((96, 192, 320, 384))}
    out = checkpoint_filter_fn(dict(tables), model)
    for i in range(4):
        side = 96 // 2 ** i
        assert out[f"stages.{i}.pos_embed"].shape[1:3] == (side, side)
        expected = resize_pos_table(tables[f"pos_embed{i + 1}"], (side, side))
        torch.testing.assert_close(out[f"stages.{i}.pos_embed"], expected)


def test_low_mixer_on_a_non_square_map():
    """Pooled 2x2, per-head softmax attention, channels head-major, each pooled cell copied to 2x2 pixels."""
    torch.manual_seed(0)
    mixer = LowMixer(8, num_heads=2, pool_size=2).eval()
    x = torch.randn(1, 8, 6, 10)
    tokens = F.avg_pool2d(x, 2).flatten(2).transpose(1, 2)  # (1, 15, 8)
    q, k, v = mixer.qkv(tokens).split(8, dim=-1)
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        heads.append(torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, dim=-1) @ v[..., s])
    expected = torch.cat(heads, dim=-1).transpose(1, 2).reshape(1, 8, 3, 5)
    expected = expected.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), expected)


def test_odd_non_square_input_drop_path_and_reset_classifier():
    # the original needs square inputs with a side divisible by 16; 200x250 failed there
    model = lowformer.create_model("inception_transformer_small", drop_path_rate=0.1, num_classes=10).eval()
    rates = [m.drop_prob for m in model.modules() if m.__class__.__name__ == "DropPath"]
    assert len(rates) == 2 * 17 and max(rates) == pytest.approx(0.1)  # two per block, the first block has none
    with torch.no_grad():
        out = model(torch.randn(1, 3, 200, 250))
        assert out.shape == (1, 10) and torch.isfinite(out).all()
        model.reset_classifier(0)
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 384)


def test_features_one_map_per_stride():
    model = lowformer.create_model("inception_transformer_small", features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 96, 160))
    assert [tuple(m.shape) for m in maps] == [(1, 96, 24, 40), (1, 192, 12, 20), (1, 320, 6, 10), (1, 384, 3, 5)]


def test_params_of_the_unfixtured_variants():
    # iFormer-L as the original reports it (86.637 M); the _384 variants only grow the position tables
    with torch.device("meta"):
        large = lowformer.create_model("inception_transformer_large")
        small_384 = lowformer.create_model("inception_transformer_small_384")
    assert sum(p.numel() for p in large.parameters()) == 86_637_096
    def tables(side: int) -> int:
        return sum(c * (side // r) ** 2 for c, r in zip((96, 192, 320, 384), (4, 8, 16, 32)))
    assert sum(p.numel() for p in small_384.parameters()) == 19_866_344 - tables(224) + tables(384)


def test_aliases_resolve_and_timm_iformer_is_untouched():
    for size in ("small", "base", "large"):
        assert lowformer.models.resolve_model_name(f"iformer{size}") == f"inception_transformer_{size}"
        assert lowformer.models.resolve_model_name(f"iformer{size}_384") == f"inception_transformer_{size}_384"
    assert lowformer.models.resolve_model_name("iformers") == "inception_transformer_small"
    # timm's iformer_s is the other (ICLR 2025) network and stays timm's
    assert lowformer.models.resolve_model_name("iformer_s") == "iformer_s"
    assert "iformer_s" not in lowformer.list_models()


@pytest.mark.parametrize("name", ["inception_transformer_small", "edgevit_xxs", "fat_b0"])
def test_traces_with_torch_fx(name):
    # deploy passes and fx feature extraction trace the graph; size-dependent parts are timm leaves
    from timm.layers import get_graph_node_names
    with torch.device("meta"):
        model = lowformer.create_model(name)
    _, eval_nodes = get_graph_node_names(model)
    assert eval_nodes[-1] == "head"
