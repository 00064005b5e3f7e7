"""Shared check of a featured family against its fixture, through the public loading path."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

import lowformer
from equivalence import assert_close_rule, case_input, fixture, original_state_dict, pooled


def write_original_checkpoint(variant: str, path: Path) -> Path:
    """The reference weights saved in the original key layout, as the original training script wraps them."""
    torch.save({"model": original_state_dict(variant), "epoch": 299}, path)
    return path


def assert_reproduces_fixture(name: str, variant: str, path: Path, tap_names: Sequence[str]) -> None:
    """`name` loaded from `path` reproduces `variant`'s fixture: params, logits and, through
    ``features_only`` with one out index per entry of `tap_names`, the shapes and pooled values of those
    fixture maps. A fixture `stem` that is not a feature tap is checked through ``model.stem``."""
    expected = fixture(variant)
    model = lowformer.create_model(name, checkpoint_path=path).eval()
    features = lowformer.create_model(name, checkpoint_path=path, features_only=True,
                                      out_indices=tuple(range(len(tap_names)))).eval()
    assert sum(p.numel() for p in model.parameters()) == expected["params"]
    for case in expected["cases"]:
        x = case_input(case)
        with torch.no_grad():
            out = model(x)
            maps = dict(zip(tap_names, features(x)))
            if "stem" not in maps:
                maps["stem"] = model.stem(x)
        assert_close_rule(out, case["output"], what=f"{variant} output")
        assert {k: list(m.shape) for k, m in maps.items()} == case["features"]
        assert_close_rule(pooled(maps["stage4"]), case["pooled_final"], what=f"{variant} pooled_final")
        for key, exp in case["pooled_stages"].items():
            assert_close_rule(pooled(maps[key]), exp, what=f"{variant} {key}")
