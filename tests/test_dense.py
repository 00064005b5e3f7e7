"""The dense-prediction backbone adapter: maps, checkpoint loading, freezing."""
from __future__ import annotations

import pytest
import timm
import torch

import lowformer
from equivalence import original_state_dict
from lowformer.dense import DenseBackboneError, create_backbone


def test_maps_are_timms_features_at_the_requested_strides():
    torch.manual_seed(0)
    b = create_backbone("lowformer_b0", strides=(8, 16, 32)).eval()
    ref = timm.create_model("lowformer_b0", features_only=True, out_indices=(1, 2, 3)).eval()
    ref.load_state_dict(b.body.state_dict())
    x = torch.randn(1, 3, 96, 160)
    out = b(x)
    assert list(out) == ["0", "1", "2"] and b.strides == [8, 16, 32]
    for o, r, c, s in zip(out.values(), ref(x), b.out_channels, b.strides):
        assert o.shape == (1, c, 96 // s, 160 // s)
        torch.testing.assert_close(o, r)


def _native(key: str) -> str:
    """A feature wrapper's key under the classifier's name (timm's wrappers add ``model.`` or use ``stages_1``)."""
    key = key.removeprefix("body.").removeprefix("model.")
    return key.replace("stages_", "stages.").replace("stem_", "stem.")


def test_original_evalmodel_checkpoint_loads_into_backbone(tmp_path):
    path = tmp_path / "evalmodel.pt"
    torch.save({"state_dict": original_state_dict("lowformer_b0")}, path)
    classifier = lowformer.create_model("lowformer_b0", checkpoint_path=path)
    b = create_backbone("lowformer_b0", strides=(4, 8, 16, 32), checkpoint_path=path)
    own = classifier.state_dict()
    loaded = b.body.state_dict()
    stage_keys = [k for k in loaded if _native(k).startswith("stages.3.")]
    assert stage_keys
    for k in stage_keys:
        torch.testing.assert_close(loaded[k], own[_native(k)])


def test_frozen_stages_get_no_gradient_and_keep_statistics():
    b = create_backbone("lowformer_b0", strides=(8, 16, 32), frozen_stages=1).train()
    frozen = {_native(n): p for n, p in b.named_parameters() if not p.requires_grad}
    assert any(n.startswith("stem.") for n in frozen) and any(n.startswith("stages.1.") for n in frozen)
    assert not any(n.startswith("stages.2.") for n in frozen)
    stats = {k: v.clone() for k, v in b.state_dict().items() if "running_mean" in k}
    sum(o.sum() for o in b(torch.randn(2, 3, 64, 64)).values()).backward()
    after = b.state_dict()
    for k, v in stats.items():
        same = torch.equal(v, after[k])
        assert same == _native(k).startswith(("stem.", "stages.0.", "stages.1.")), k
    assert all(p.grad is None for p in frozen.values())


def test_freeze_bn_keeps_batchnorm_fixed():
    b = create_backbone("lowformer_b0", strides=(16, 32), freeze_bn=True).train()
    before = {k: v.clone() for k, v in b.state_dict().items()}
    b(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in b.modules())


@pytest.mark.parametrize("kwargs, words", [
    ({"strides": (64,)}, "no feature map at stride [64]"),
    ({"strides": (8, 16), "frozen_stages": 3}, "frozen_stages=3"),
])
def test_bad_requests_are_one_line(kwargs, words):
    with pytest.raises(DenseBackboneError) as e:
        create_backbone("lowformer_b0", **kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)
