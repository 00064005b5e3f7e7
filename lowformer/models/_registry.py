"""Which timm models belong to the project, their short aliases, and the one ``create_model``.

timm's registry stays the single source of model factories. This module only records which entries
the project offers (its own family modules under ``lowformer.models`` plus chosen timm families such as
LowFormer), the short names the original code accepts, and per-model feature-extractor classes.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
from typing import Any

import timm
import torch.nn as nn
from timm.models import model_entrypoint

from lowformer.checkpoints import find_pretrained_file, load_checkpoint
from lowformer.errors import LowformerError

__all__ = [
    "DuplicateRegistrationError", "UnknownModelError", "create_model", "list_models", "resolve_model_name",
    "register_project_models", "register_aliases", "register_feature_cls", "register_pretrained_cfg_overlay",
]

_PROJECT_TIMM_MODELS: set[str] = set()
_ALIASES: dict[str, str] = {}
_FEATURE_CLS: dict[str, type] = {}
_DEFAULT_OUT_INDICES: dict[str, tuple[int, ...]] = {}
_CFG_OVERLAYS: dict[str, dict[str, Any]] = {}


class UnknownModelError(LowformerError, KeyError):
    """A model name that neither the project nor timm knows."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_project_models(names: list[str]) -> None:
    """Offer these timm models as the project's own (listed by ``list_models`` and ``lowformer models``)."""
    _PROJECT_TIMM_MODELS.update(names)


class DuplicateRegistrationError(LowformerError, ValueError):
    """A name registered twice for different things."""


def register_aliases(aliases: dict[str, str]) -> None:
    """Short names, such as the original benchmark's ``--other`` names, that resolve to registry names;
    an alias already taken by another target is refused."""
    for alias, target in aliases.items():
        if _ALIASES.get(alias, target) != target:
            raise DuplicateRegistrationError(f"alias '{alias}' is registered for '{_ALIASES[alias]}' already, "
                                             f"not also for '{target}': pick another alias")
    _ALIASES.update(aliases)


def register_feature_cls(names: list[str], feature_cls: type, out_indices: tuple[int, ...]) -> None:
    """Use ``feature_cls`` (a timm feature wrapper) and these default ``out_indices`` for ``features_only``."""
    for name in names:
        _FEATURE_CLS[name] = feature_cls
        _DEFAULT_OUT_INDICES[name] = out_indices


def register_pretrained_cfg_overlay(names: list[str], **values: Any) -> None:
    """Evaluation defaults (``crop_pct``, ...) that ``create_model`` puts into these timm models'
    ``pretrained_cfg`` where the original differs from timm (Visformer V1's 0.875 crop); timm's own
    registry entries stay unchanged."""
    for name in names:
        _CFG_OVERLAYS.setdefault(name, {}).update(values)


def _is_project_model(name: str) -> bool:
    if name in _PROJECT_TIMM_MODELS:
        return True
    return model_entrypoint(name).__module__.startswith("lowformer.")


def list_models(pattern: str = "*") -> list[str]:
    """The project's models (LowFormer, the sibling families, featured backbones) matching ``pattern``, by
    registry name or by an alias (``mobilevigm`` finds ``mobilevig_m``)."""
    names = {n for n in timm.list_models() if _is_project_model(n)}
    found = {n for n in names if fnmatch.fnmatch(n, pattern)}
    found |= {t for a, t in _ALIASES.items() if t in names and fnmatch.fnmatch(a, pattern)}
    return sorted(found)


def resolve_model_name(name: str) -> str:
    """Map an alias to its registry name and check that the model exists.

    Raises UnknownModelError with close matches and where to look."""
    name = _ALIASES.get(name, name)
    if timm.is_model(name):
        return name
    candidates = difflib.get_close_matches(name, list_models() + list(_ALIASES), n=3, cutoff=0.6)
    if not candidates:
        candidates = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.75)
    hint = f"did you mean {', '.join(candidates)}? " if candidates else ""
    raise UnknownModelError(f"unknown model '{name}': {hint}`lowformer models` lists the project's models "
                            "and any timm model name works too")


def create_model(
        name: str,
        pretrained: bool = False,
        checkpoint_path: str | os.PathLike | None = None,
        **kwargs: Any,
) -> nn.Module:
    """Build a project or timm model, optionally with weights from a local file.

    Args:
        name: registry name (``lowformer_b1``), an alias of the original code (``mobileones1``) or any timm name.
        pretrained: load ``<weights dir>/<name>.{safetensors,pth,...}`` (see ``lowformer.weights_dir``);
            fails with a message naming the file when it is absent. Nothing is ever downloaded.
        checkpoint_path: our checkpoints, timm's, safetensors, or the original repositories' files as they
            are; loaded strictly through the family's key filter.
        **kwargs: model arguments (``num_classes``, ``drop_path_rate``, ``features_only``, ``out_indices``...).
    """
    name = resolve_model_name(name)
    weights = checkpoint_path if checkpoint_path is not None else (find_pretrained_file(name) if pretrained else None)
    overlay = {**_CFG_OVERLAYS.get(name, {}), **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    if kwargs.get("features_only"):
        if name in _FEATURE_CLS:
            kwargs.setdefault("feature_cls", _FEATURE_CLS[name])
            kwargs.setdefault("out_indices", _DEFAULT_OUT_INDICES[name])
        if weights is None:
            return timm.create_model(name, pretrained=False, **kwargs)
        # Load the whole classifier strictly, then let timm cut the feature extractor out of it.
        feature_args = {k: kwargs.pop(k) for k in ("features_only", "out_indices", "feature_cls")
                        if k in kwargs}
        full = load_checkpoint(timm.create_model(name, pretrained=False, **kwargs), weights)
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", {}), state_dict=full.state_dict())
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs, **feature_args)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if weights is not None:
        load_checkpoint(model, weights)
    return model
