"""The model registry: one record per model (aliases, cfg overlay, checkpoint filter, original layout), registered
by the models package itself, duplicates refused, aliases listed."""
import dataclasses

import pytest
import timm
import torch

import lowformer
from lowformer.models import DuplicateRegistrationError, ModelRecord, model_record, register_aliases, register_record


def test_models_package_registers_the_original_names():
    """The featured short names belong to the models package (bench only re-exports them)."""
    from lowformer.bench import featured
    from lowformer.models.featured import timm_families
    assert featured.FEATURED_ALIASES is timm_families.FEATURED_ALIASES
    assert lowformer.models.resolve_model_name("mobileones1") == "mobileone_s1"
    assert lowformer.models.resolve_model_name("mobilevigm") == "mobilevig_m"


def test_alias_taken_by_another_model_is_refused():
    with pytest.raises(DuplicateRegistrationError, match="alias 'mobilevigm' is registered for 'mobilevig_m'"):
        register_aliases({"mobilevigm": "mobilevig_s"})
    register_aliases({"mobilevigm": "mobilevig_m"})  # the same record again is no conflict


def test_list_models_finds_original_names():
    assert lowformer.list_models("mobilevigm") == ["mobilevig_m"]
    assert "edgevit_xs" in lowformer.list_models("edgevit*")


def test_one_record_holds_aliases_overlay_filter_and_layout():
    from lowformer.models import lowformer as lowformer_family
    from lowformer.models import visformer_v2
    from lowformer.models.featured import fat
    v1 = model_record("visformer_tiny")
    assert v1.cfg_overlay == {"crop_pct": 0.875} and v1.checkpoint_filter is visformer_v2.checkpoint_filter_fn
    assert model_record("fat_b0").aliases == ("FATb0", "fatb0")
    assert model_record("fat_b0").checkpoint_filter is fat.checkpoint_filter_fn
    b2 = model_record("lowformer_b2")  # timm's unofficial config: exportable to the original layout, not listed
    assert b2.original_layout is lowformer_family.to_original_state_dict and not b2.listed
    assert "lowformer_b2" not in lowformer.list_models() and "lowformer_b1" in lowformer.list_models()


def test_create_model_applies_the_records_cfg_overlay():
    assert timm.models.get_pretrained_cfg("visformer_tiny").crop_pct == 0.9  # timm's own entry stays as it is
    with torch.device("meta"):
        assert lowformer.create_model("visformer_tiny").pretrained_cfg["crop_pct"] == 0.875


def test_every_alias_of_a_listed_model_resolves_to_it():
    pairs = [(a, n) for n in lowformer.list_models() for a in model_record(n).aliases]
    assert len(pairs) > 30
    assert all(lowformer.models.resolve_model_name(a) == n for a, n in pairs)


def test_a_second_different_record_is_refused():
    rec = model_record("ffnet_1")
    with pytest.raises(DuplicateRegistrationError, match="model 'ffnet_1' has a registry record already"):
        register_record(dataclasses.replace(rec, listed=False))
    assert model_record("ffnet_1") is rec
    assert register_record(rec) is rec  # the same record again is no conflict


def test_an_alias_naming_another_model_is_refused():
    with pytest.raises(DuplicateRegistrationError, match="alias 'ffnet_2' of 'registry_test_model' is a registered model name"):
        register_record(ModelRecord("registry_test_model", aliases=("ffnet_2",)))
    with pytest.raises(DuplicateRegistrationError, match="alias 'ffnet1' is registered for 'ffnet_1'"):
        register_record(ModelRecord("registry_test_model", aliases=("ffnet1",)))
    assert model_record("registry_test_model") is None


def test_checkpoint_filter_lookup_prefers_the_record(monkeypatch):
    from timm.models import convnext

    from lowformer.checkpoints import _checkpoint_filter
    from lowformer.models import _registry
    with torch.device("meta"):
        model = lowformer.create_model("convnext_atto")
    assert model_record("convnext_atto") is None
    assert _checkpoint_filter(model) is convnext.checkpoint_filter_fn  # no record: timm's family filter

    def own_filter(state_dict, model):
        return state_dict

    monkeypatch.setitem(_registry._RECORDS, "convnext_atto", ModelRecord("convnext_atto", checkpoint_filter=own_filter))
    assert _checkpoint_filter(model) is own_filter
