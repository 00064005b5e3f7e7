"""Which timm models belong to the project, what the project knows about each, and the one ``create_model``.

timm's registry stays the single source of model factories. Beside each ``@register_model`` the project
keeps one :class:`ModelRecord` per name: whether ``list_models`` offers it, the short names the original
code accepts, ``pretrained_cfg`` values that differ from timm's, the checkpoint filter that maps original
layouts, the inverse map back to the original layout, and the feature-extractor class. Every lookup
(aliases, ``list_models``, ``create_model``, checkpoint loading and export) reads these records.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import timm
import torch
import torch.nn as nn
from timm.models import register_model

from lowformer.checkpoints import CheckpointError, load_checkpoint, pretrained_weights, weights_dir
from lowformer.errors import LowformerError

__all__ = [
    "DuplicateRegistrationError", "ModelRecord", "UnknownModelError", "checkpoint_filter", "create_model",
    "list_models", "model_record", "original_layout", "record", "register_aliases", "register_feature_cls",
    "register_pretrained_cfg_overlay", "register_project_models", "register_record", "resolve_model_name",
    "take_over_timm_models",
]

FilterFn = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
EntryPoint = TypeVar("EntryPoint", bound=Callable[..., nn.Module])

_HUB_PREFIXES = ("hf-hub:", "local-dir:")


class UnknownModelError(LowformerError, KeyError):
    """A model name that neither the project nor timm knows."""

    def __str__(self) -> str:
        return str(self.args[0])


class DuplicateRegistrationError(LowformerError, ValueError):
    """A name registered twice for different things."""


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """What the project knows about one timm registry name.

    Attributes:
        name: the registry name.
        aliases: other names that resolve to it (the original code's spellings).
        listed: offered as a project model by ``list_models`` / ``lowformer models``.
        cfg_overlay: ``pretrained_cfg`` values ``create_model`` sets where the original differs from timm.
        checkpoint_filter: maps original checkpoint layouts to the model's keys; None: the model class's
            module's ``checkpoint_filter_fn`` (timm's convention).
        original_layout: renames native keys to the original repository's layout (the filter's inverse).
        feature_cls, out_indices: timm feature wrapper and default taps for ``features_only``.
    """

    name: str
    aliases: tuple[str, ...] = ()
    listed: bool = True
    cfg_overlay: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint_filter: FilterFn | None = None
    original_layout: FilterFn | None = None
    feature_cls: type | None = None
    out_indices: tuple[int, ...] | None = None


_RECORDS: dict[str, ModelRecord] = {}
_ALIASES: dict[str, str] = {}  # alias -> name, the index of the records' aliases


def register_record(rec: ModelRecord) -> ModelRecord:
    """Add ``rec``; a different record for the same name, or an alias that names another model, is refused
    (the same record again is no conflict)."""
    old = _RECORDS.get(rec.name)
    if old is not None and old != rec:
        raise DuplicateRegistrationError(f"model '{rec.name}' has a registry record already; a second, different "
                                         "one would silently replace it: register each model once")
    for alias in rec.aliases:
        if alias in _RECORDS:
            raise DuplicateRegistrationError(f"alias '{alias}' of '{rec.name}' is a registered model name: "
                                             "pick another alias")
        if _ALIASES.get(alias, rec.name) != rec.name:
            raise DuplicateRegistrationError(f"alias '{alias}' is registered for '{_ALIASES[alias]}' already, "
                                             f"not also for '{rec.name}': pick another alias")
    _RECORDS[rec.name] = rec
    _ALIASES.update((alias, rec.name) for alias in rec.aliases)
    return rec


def _update(name: str, **changes: Any) -> None:
    """Amend the record of ``name`` (a timm model without one gets an unlisted record first)."""
    old = _RECORDS.get(name, ModelRecord(name, listed=False))
    new = dataclasses.replace(old, **changes)
    _RECORDS.pop(name, None)
    try:
        register_record(new)
    except DuplicateRegistrationError:
        _RECORDS[name] = old
        raise


def record(**fields: Any) -> Callable[[EntryPoint], EntryPoint]:
    """Decorator beside ``@register_model``: the project's record for the entry point below it (listed;
    checkpoint filter: its module's ``checkpoint_filter_fn``)."""
    def decorate(fn: EntryPoint) -> EntryPoint:
        fields.setdefault("checkpoint_filter", getattr(sys.modules[fn.__module__], "checkpoint_filter_fn", None))
        register_record(ModelRecord(fn.__name__, **{**fields, "aliases": tuple(fields.get("aliases", ()))}))
        return fn
    return decorate


def model_record(name: str) -> ModelRecord | None:
    """The record of a registry name (aliases are not resolved here), None for a timm model without one."""
    return _RECORDS.get(name)


def _architecture(model: nn.Module) -> str | None:
    return getattr(model, "pretrained_cfg", {}).get("architecture")


def checkpoint_filter(model: nn.Module) -> FilterFn | None:
    """The key filter for checkpoints of ``model``: its record's, else its class's module's
    ``checkpoint_filter_fn`` (timm's families), else None."""
    rec = _RECORDS.get(_architecture(model))
    if rec is not None and rec.checkpoint_filter is not None:
        return rec.checkpoint_filter
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def original_layout(model: nn.Module) -> FilterFn | None:
    """The native -> original key map of ``model``'s record, None where the family has none."""
    rec = _RECORDS.get(_architecture(model))
    return rec.original_layout if rec is not None else None


def register_project_models(names: list[str]) -> None:
    """Offer these timm models as the project's own (listed by ``list_models`` and ``lowformer models``)."""
    for name in names:
        _update(name, listed=True)


def register_aliases(aliases: dict[str, str]) -> None:
    """Short names, such as the original benchmark's ``--other`` names, that resolve to registry names;
    an alias already taken by another target is refused."""
    for alias, target in aliases.items():
        current = _RECORDS.get(target)
        if current is None or alias not in current.aliases:
            _update(target, aliases=(current.aliases if current else ()) + (alias,))


def register_feature_cls(names: list[str], feature_cls: type, out_indices: tuple[int, ...]) -> None:
    """Use ``feature_cls`` (a timm feature wrapper) and these default ``out_indices`` for ``features_only``."""
    for name in names:
        _update(name, feature_cls=feature_cls, out_indices=tuple(out_indices))


def register_pretrained_cfg_overlay(names: list[str], **values: Any) -> None:
    """Evaluation defaults (``crop_pct``, ...) that ``create_model`` puts into these timm models'
    ``pretrained_cfg`` where the original differs from timm; timm's own registry entries stay unchanged."""
    for name in names:
        current = _RECORDS.get(name)
        _update(name, cfg_overlay={**(current.cfg_overlay if current else {}), **values})


def take_over_timm_models(module: str, variants: Iterable[str], create: Callable[..., nn.Module], doc: str,
                          **fields: Any) -> dict[str, Callable]:
    """Register, under timm's own names, entry points building ``create(variant, pretrained, **kwargs)`` (a
    subclass of timm's model) for a family kept as timm's, each with its record (``fields``); replacing
    timm's entries makes ``timm.create_model`` build the same model as ``create_model``. Returns the entry
    points by name, for ``module``'s namespace."""
    entrypoints = {}
    with warnings.catch_warnings():  # timm warns that the names it registered are taken over
        warnings.simplefilter("ignore")
        for variant in variants:
            entrypoints[variant] = record(**fields)(register_model(_entrypoint(module, variant, create, doc)))
    return entrypoints


def _entrypoint(module: str, variant: str, create: Callable[..., nn.Module], doc: str) -> Callable[..., nn.Module]:
    def fn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create(variant, pretrained=pretrained, **kwargs)
    fn.__name__ = fn.__qualname__ = variant
    fn.__module__ = module
    fn.__doc__ = f"{variant}: {doc}"
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """The project's models (LowFormer, the sibling families, featured backbones) matching ``pattern``, by
    registry name or by an alias (``mobilevigm`` finds ``mobilevig_m``)."""
    names = {n for n, rec in _RECORDS.items() if rec.listed and timm.is_model(n)}
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
    rec = _RECORDS.get(name, ModelRecord(name, listed=False))
    overlay = {**rec.cfg_overlay, **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    if kwargs.get("features_only"):
        if rec.feature_cls is not None:
            kwargs.setdefault("feature_cls", rec.feature_cls)
            kwargs.setdefault("out_indices", rec.out_indices)
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
