"""Helpers for the architecture-equivalence tests: fixtures, original-layout checkpoint files, pass rule.

A fixture under ``tests/fixtures/reference/<variant>/`` (copied from the original implementation's runs)
holds the original state-dict layout (``keys.tsv``) and the original outputs for deterministic weights
and inputs (``expected.json``); ``refweights.py`` is the rule that made the weights. See the README there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from refweights import read_manifest, reference_input, reference_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "reference"


def fixture(variant: str) -> dict[str, Any]:
    """``expected.json`` of a variant, plus ``stages.json`` under ``"stages"`` where present."""
    folder = FIXTURES / variant
    data = json.loads((folder / "expected.json").read_text())
    if (folder / "stages.json").exists():
        data["stages"] = json.loads((folder / "stages.json").read_text())
    return data


def original_state_dict(variant: str, weight_scale: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The reference weights in the ORIGINAL key layout, as a released checkpoint would hold them.

    Float entries follow the reference rule; ``num_batches_tracked`` counters are stored as real
    checkpoints store them; other integer buffers are left for the model to compute."""
    manifest = read_manifest(FIXTURES / variant / "keys.tsv")
    state_dict = reference_state_dict(manifest)
    if weight_scale:
        for key in state_dict:
            if key.endswith(tuple(weight_scale["key_suffixes"])):
                state_dict[key] = state_dict[key] * weight_scale["factor"]
    ordered = {}
    for key, shape, dtype in manifest:
        if key in state_dict:
            ordered[key] = state_dict[key]
        elif key.endswith("num_batches_tracked"):
            ordered[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
    return ordered


def case_input(case: dict[str, Any]) -> torch.Tensor:
    i = case["input"]
    return reference_input(i["batch"], i["height"], i["width"], i["seed"])


def assert_close_rule(actual: torch.Tensor, expected: Sequence, tol: float = 1e-4, what: str = "") -> None:
    """The fixtures' pass rule: element-wise within ``tol * max(1, max|expected|)`` for the whole array."""
    expected_t = torch.tensor(expected, dtype=torch.float64)
    actual_t = actual.detach().to(torch.float64).reshape(expected_t.shape)
    bound = tol * max(1.0, expected_t.abs().max().item())
    err = (actual_t - expected_t).abs().max().item()
    assert err <= bound, f"{what}: max |diff| {err:.3g} exceeds {bound:.3g}"


def pooled(feature: torch.Tensor) -> torch.Tensor:
    """A feature map averaged over its spatial positions (NCHW or NLC token layouts as NCHW)."""
    return feature.mean(dim=(2, 3))
