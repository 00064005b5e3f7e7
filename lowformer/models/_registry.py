"""Which timm models belong to the project, their short aliases, and the one ``create_model``.

timm's registry stays the single source of model factories. This module only records which entries
the project offers (its own family modules under ``lowformer.models`` plus chosen timm families such as
LowFormer), the short names the original code accepts, and per-model feature-extractor classes.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import timm
import torch.nn as nn
from timm.models import model_entrypoint, register_model

from lowformer.checkpoints import CheckpointError, load_checkpoint, pretrained_weights, weights_dir
from lowformer.errors import LowformerError

__all__ = [
    "DuplicateRegistrationError", "UnknownModelError", "create_model", "list_models", "resolve_model_name",
    "register_project_models", "register_aliases", "register_feature_cls", "register_pretrained_cfg_overlay",
    "take_over_timm_models",
]

_PROJECT_TIMM_MODELS: set[str] = set()
_ALIASES: dict[str, str] = {}
_FEATURE_CLS: dict[str, type] = {}
_DEFAULT_OUT_INDICES: dict[str, tuple[int, ...]] = {}
_CFG_OVERLAYS: dict[str, dict[str, Any]] = {}
_HUB_PREFIXES = ("hf-hub:", "local-dir:")


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


def take_over_timm_models(
        module: str, variants: Iterable[str], create: Callable[..., nn.Module], doc: str) -> dict[str, Callable]:
    """Register, under timm's own names, entry points building ``create(variant, pretrained, **kwargs)`` (a
    subclass of timm's model) for a family kept as timm's; replacing timm's entries makes
    ``timm.create_model`` build the same model as ``create_model``. Returns the entry points by name, for
    ``module``'s namespace."""
    entrypoints = {}
    with warnings.catch_warnings():  # timm warns that the names it registered are taken over
        warnings.simplefilter("ignore")
        for variant in variants:
            entrypoints[variant] = register_model(_entrypoint(module, variant, create, doc))
    return entrypoints


def _entrypoint(module: str, variant: str, create: Callable[..., nn.Module], doc: str) -> Callable[..., nn.Module]:
    def fn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create(variant, pretrained=pretrained, **kwargs)
    fn.__name__ = fn.__qualname__ = variant
    fn.__module__ = module
    fn.__doc__ = f"{variant}: {doc}"
    return fn


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

    Hub names (``hf-hub:...``, ``local-dir:DIR``) are returned as they are, timm resolves them.
    Raises UnknownModelError with close matches and where to look."""
    if name.startswith(_HUB_PREFIXES):
        _check_local_dir(name)
        return name
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
    """Build a project or timm model, optionally with weights.

    Args:
        name: registry name (``lowformer_b1``), an alias of the original code (``mobileones1``), any timm
            name, or a timm Hub name: ``hf-hub:timm/lowformer_b0.in1k`` or ``local-dir:DIR`` (a folder with
            ``config.json`` and ``model.safetensors``, as ``lowformer.hub.save_pretrained`` writes it).
        pretrained: the local weights folder's ``<name>.{safetensors,pth,...}`` when present (see
            ``lowformer.weights_dir``), else timm's published weights where timm has them (downloaded once
            into the Hugging Face cache); fails with a message naming the file when neither exists. For
            Hub names, the Hub repository's or folder's weights.
        checkpoint_path: our checkpoints, timm's, safetensors, or the original repositories' files as they
            are; loaded strictly through the family's key filter.
        **kwargs: model arguments (``num_classes``, ``drop_path_rate``, ``features_only``, ``out_indices``...).
    """
    if name.startswith(_HUB_PREFIXES):
        return _create_hub_model(name, pretrained, checkpoint_path, **kwargs)
    name = resolve_model_name(name)
    weights = checkpoint_path
    published = False
    if weights is None and pretrained:
        weights = pretrained_weights(name)
        published = weights is None
    overlay = {**_CFG_OVERLAYS.get(name, {}), **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    if kwargs.get("features_only"):
        if name in _FEATURE_CLS:
            kwargs.setdefault("feature_cls", _FEATURE_CLS[name])
            kwargs.setdefault("out_indices", _DEFAULT_OUT_INDICES[name])
        if weights is None:
            return _timm_create(name, published, **kwargs)
        # Load the whole classifier strictly, then let timm cut the feature extractor out of it.
        feature_args = {k: kwargs.pop(k) for k in ("features_only", "out_indices", "feature_cls")
                        if k in kwargs}
        full = load_checkpoint(timm.create_model(name, pretrained=False, **kwargs), weights)
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", {}), state_dict=full.state_dict())
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs, **feature_args)
    model = _timm_create(name, published, **kwargs)
    if weights is not None:
        load_checkpoint(model, weights)
    return model


def _create_hub_model(name: str, pretrained: bool, checkpoint_path: str | os.PathLike | None,
                      **kwargs: Any) -> nn.Module:
    """timm resolves the architecture from the Hub repository's or folder's ``config.json``."""
    _check_local_dir(name)
    model = _timm_create(name, pretrained and checkpoint_path is None, **kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    return model


def _check_local_dir(name: str) -> None:
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):]).expanduser()
        if not (folder / "config.json").is_file():
            raise UnknownModelError(f"model '{name}': '{folder}' holds no config.json; `lowformer export --format hf "
                                    "--out DIR` writes such a folder")


def _timm_create(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model``, with a failed download or missing Hub file as one CheckpointError line."""
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        local = "" if name.startswith(_HUB_PREFIXES) else f", or put the file at {weights_dir() / name}.pth"
        raise CheckpointError(f"Could not get timm's published weights for '{name}' ({type(e).__name__}: {text}). "
                              f"Check the network or the Hugging Face cache (HF_HUB_OFFLINE=1 reads only the cache)"
                              f"{local}.") from None
