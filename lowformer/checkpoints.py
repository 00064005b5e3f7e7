"""Safe checkpoint reading and strict, explained loading.

Checkpoints are read without executing code: safetensors, or ``torch.load(weights_only=True)`` with
exactly two harmless metadata types let through (``argparse.Namespace`` and yacs' ``CfgNode``, which
original training checkpoints carry). Foreign key layouts are mapped by the model family's own
``checkpoint_filter_fn`` (timm's convention), so every quirk of an original repository lives in one
function beside the model it belongs to.

Every failure raises :class:`CheckpointError` with one line naming the file and what is wrong.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from lowformer.errors import LowformerError

__all__ = [
    "CheckpointError", "read_checkpoint", "extract_state_dict", "load_checkpoint",
    "weights_dir", "find_pretrained_file", "pretrained_weights", "has_published_weights", "to_original_layout",
]

StateDict = dict[str, torch.Tensor]
FilterFn = Callable[[StateDict, nn.Module], StateDict]

# Containers under which known training scripts nest the network weights, most specific first.
_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net", "module")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".pth.tar")


class CheckpointError(LowformerError, ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class _CfgNodeAsDict:
    """Stand-in for ``yacs.config.CfgNode``: configs stored in original checkpoints unpickle as plain
    ordered dicts, without importing (or trusting) yacs. Creating one yields an ``OrderedDict``, the dict
    type whose items and attributes the weights-only unpickler is able to restore."""

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


_SAFE_METADATA = [argparse.Namespace, (_CfgNodeAsDict, "yacs.config.CfgNode")]


def to_original_layout(state_dict: StateDict, model: nn.Module) -> StateDict:
    """``state_dict`` under the original repository's keys where the model's registry record has that map,
    else unchanged. ``load_checkpoint`` reads either layout."""
    from lowformer.models._registry import original_layout  # the models package imports this module

    fn = original_layout(model)
    return fn(state_dict, model) if fn is not None else state_dict


def _checkpoint_filter(model: nn.Module) -> FilterFn | None:
    from lowformer.models._registry import checkpoint_filter

    return checkpoint_filter(model)


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Read a checkpoint file without running code from it.

    Raises CheckpointError saying what the file is when it is not a checkpoint (a directory, a
    safetensors file under another suffix, JSON or other bytes), for a truncated or corrupt file, and
    for a pickle that holds objects other than tensors, containers and the two allowed metadata types."""
    path = Path(path)
    if path.is_dir():
        hint = (f"; it holds a timm/Hugging Face model folder, so use the model name 'local-dir:{path}'"
                if (path / "config.json").is_file() else
                ", e.g. checkpoint/evalmodel.pt inside a run directory")
        raise CheckpointError(f"Checkpoint '{path}' is a directory, not a file. Pass the weights file itself{hint}.")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' was not found (no such file).")
    kind = _file_kind(path)
    if path.suffix == ".safetensors" or kind == "safetensors":
        if path.suffix != ".safetensors":
            raise CheckpointError(f"Checkpoint '{path}' is a safetensors file; name it "
                                  f"'{path.with_suffix('.safetensors').name}' so that it is read as one.")
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"Checkpoint '{path}' is not a readable safetensors file "
                                  f"({_first_line(e)}).") from None
    if kind not in ("zip", "pickle"):
        raise CheckpointError(f"Checkpoint '{path}' is not a PyTorch checkpoint: it is {kind}, while torch.save "
                              "writes a zip archive (or a pickle in the legacy format).")
    try:
        with torch.serialization.safe_globals(_SAFE_METADATA):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]*\w)", str(e))
        if found:
            raise CheckpointError(
                f"Checkpoint '{path}' was refused: it contains an object of type '{found.group(1)}', and only "
                "tensors, containers, argparse.Namespace and yacs CfgNode are loaded (nothing in it was executed).") from None
        raise CheckpointError(f"Checkpoint '{path}' is truncated or corrupt ({_first_line(e)}).") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"Checkpoint '{path}' is a {kind} file but truncated or corrupt, so not a readable "
                              f"PyTorch checkpoint ({_first_line(e)}).") from None


def _file_kind(path: Path) -> str:
    """What the first bytes say the file is: ``zip``, ``pickle``, ``safetensors`` or a description."""
    with path.open("rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"
    # safetensors: an 8-byte little-endian header length, then that many bytes of JSON.
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON or text file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "a file of unknown format"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj: Any, path: str | os.PathLike = "<memory>") -> StateDict:
    """Find the network weights in a loaded checkpoint: a bare state dict, or one nested under
    ``state_dict`` (LowFormer, timm), ``model`` (Visformer, DWNet, ours) and similar keys. A
    DistributedDataParallel ``module.`` prefix is removed."""
    if not _is_state_dict(obj) and isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        keys = list(obj)[:6] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"Checkpoint '{path}' holds no state dict of tensors (top level: {keys}).")
    state_dict = dict(obj)
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _examples(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load weights from ``path`` into ``model`` (in place) and return it.

    Accepts our checkpoints, safetensors, timm checkpoints and the original repositories' files as they
    are; the model family's ``checkpoint_filter_fn`` maps original key layouts. Integer buffers that a
    model computes itself (``num_batches_tracked``, ``relative_position_index``) may be absent. With
    ``strict`` any other missing or unexpected key, or a shape mismatch, raises CheckpointError listing
    counts and examples."""
    state_dict = extract_state_dict(read_checkpoint(path), path)
    filter_fn = _checkpoint_filter(model)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except (KeyError, RuntimeError, ValueError, IndexError) as e:
            raise CheckpointError(f"Checkpoint '{path}' has a key layout not recognised for "
                                  f"{_model_name(model)} ({_first_line(e)}).") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not _self_computed(k, own[k])]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                  for k in state_dict if k in own and state_dict[k].shape != own[k].shape]
    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {_examples(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {_examples(mismatched, 2)})")
        raise CheckpointError(f"Checkpoint '{path}' does not fit {_model_name(model)}: " + "; ".join(parts)
                              + ". Is it a checkpoint of another variant or num_classes?")
    loadable = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    return model


def _self_computed(key: str, value: torch.Tensor) -> bool:
    """Integer buffers are recomputed by the model, so checkpoints may omit them."""
    return not value.is_floating_point() and not value.is_complex()


def _model_name(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def weights_dir() -> Path:
    """Local folder that ``pretrained=True`` reads: ``$LOWFORMER_WEIGHTS`` or ``~/.cache/lowformer/weights``."""
    env = os.environ.get("LOWFORMER_WEIGHTS")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lowformer" / "weights"


def find_pretrained_file(model_name: str) -> Path:
    """Return the local weights file for ``model_name``; never downloads.

    Raises CheckpointError saying which file to put where when none is present."""
    found = _local_pretrained_file(model_name)
    if found is None:
        raise CheckpointError(f"No pretrained weights for '{model_name}' in the weights folder: "
                              f"{_where_to_put(model_name)}.")
    return found


def pretrained_weights(model_name: str) -> Path | None:
    """Where ``pretrained=True`` takes the weights of ``model_name`` from: the local weights folder's
    file when there is one, else None when timm publishes weights for it (timm then downloads them, or
    reads them from the Hugging Face cache). Raises CheckpointError when neither has them."""
    found = _local_pretrained_file(model_name)
    if found is not None or has_published_weights(model_name):
        return found
    raise CheckpointError(f"No pretrained weights for '{model_name}': timm publishes none, so "
                          f"{_where_to_put(model_name)}.")


def has_published_weights(model_name: str) -> bool:
    """Whether timm's registry names downloadable weights (a Hugging Face Hub repository or a URL)."""
    from timm.models import get_pretrained_cfg
    try:
        cfg = get_pretrained_cfg(model_name)
    except RuntimeError:
        return False
    return cfg is not None and bool(cfg.hf_hub_id or cfg.url)


def _local_pretrained_file(model_name: str) -> Path | None:
    folder = weights_dir()
    for suffix in _WEIGHT_SUFFIXES:
        candidate = folder / f"{model_name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _where_to_put(model_name: str) -> str:
    folder = weights_dir()
    return (f"put the checkpoint file at {folder / model_name}.pth (or {model_name}.safetensors; the original "
            "release files work as they are), or set LOWFORMER_WEIGHTS to the folder that holds it")
