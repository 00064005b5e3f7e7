"""The model registry: aliases registered by the models package itself, duplicates refused, aliases listed."""
import pytest

import lowformer
from lowformer.models import DuplicateRegistrationError, register_aliases


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
