"""Any project backbone as a multi-scale feature extractor for detection and segmentation heads.

One adapter for every dense-prediction task: it builds the model through ``lowformer.create_model``
with ``features_only`` (so the maps are exactly the ones ``timm.create_model`` gives), picks the maps
at the requested strides, loads a classification checkpoint into it (any layout ``load_checkpoint``
reads, including the original repositories' files such as LowFormer's ``evalmodel.pt``), and applies
mmdetection-style ``frozen_stages`` and frozen BatchNorm.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn

from lowformer.errors import LowformerError
from lowformer.models import create_model

__all__ = ["DenseBackbone", "DenseBackboneError", "create_backbone"]

_TAPS: dict[tuple[str, tuple], list[dict[str, Any]]] = {}


class DenseBackboneError(LowformerError, ValueError):
    """A backbone request that the model cannot satisfy (a stride it does not have, a bad freeze depth)."""


def _all_taps(name: str, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Every feature map the model can return (``feature_info`` over all taps), cached per name/arguments."""
    key = (name, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    if key not in _TAPS:
        probe = create_model(name, features_only=True, **kwargs)
        _TAPS[key] = [dict(d) for d in probe.feature_info.info]
    return _TAPS[key]


class DenseBackbone(nn.Module):
    """Feature maps of a project backbone as an ``OrderedDict`` {"0": stride s0 map, "1": ...}.

    Attributes:
        out_channels: channels of each returned map (what torchvision's FPN takes as ``in_channels_list``).
        strides: the stride of each returned map.
        name: the backbone's registry name.
    """

    def __init__(
            self,
            name: str,
            strides: Sequence[int] | None = (4, 8, 16, 32),
            out_indices: Sequence[int] | None = None,
            checkpoint_path: str | os.PathLike | None = None,
            pretrained: bool = False,
            frozen_stages: int = -1,
            freeze_bn: bool = False,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            name: any ``lowformer.create_model`` name.
            strides: strides of the maps to return (ignored when ``out_indices`` is given).
            out_indices: timm ``out_indices`` into the model's feature taps, instead of ``strides``.
            checkpoint_path: a classification checkpoint to load (strictly, as a whole classifier).
            pretrained: load the local pretrained file (``lowformer.weights_dir``); never downloads.
            frozen_stages: -1 trains everything; k >= 0 freezes the stem and the first k returned stages
                (mmdetection's convention; 0 freezes the stem only).
            freeze_bn: replace every BatchNorm by a frozen copy (fixed statistics and affine), as detectors
                trained with small per-device batches do.
            **kwargs: model arguments (``drop_path_rate``, ``output_stride``, ``img_size``...).
        """
        super().__init__()
        self.name = name
        if out_indices is None:
            taps = _all_taps(name, kwargs)
            have = [t["reduction"] for t in taps]
            # The last tap of a stride: stages that keep a stride end with their output map.
            index = {s: max(i for i, r in enumerate(have) if r == s) for s in set(have)}
            missing = [s for s in strides if s not in index]
            if missing:
                raise DenseBackboneError(
                    f"backbone '{name}' has no feature map at stride {missing}; its maps are at strides "
                    f"{sorted(set(have))} (pass strides= from those, or out_indices=)")
            out_indices = [index[s] for s in strides]
        if checkpoint_path is not None and "num_classes" not in kwargs:
            kwargs["num_classes"] = _classifier_size(name, checkpoint_path, kwargs)
        self.body = create_model(name, features_only=True, out_indices=tuple(out_indices),
                                 checkpoint_path=checkpoint_path, pretrained=pretrained, **kwargs)
        self.out_channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())
        self._freeze(frozen_stages)
        if freeze_bn:
            self.body = freeze_batch_norm_2d(self.body)

    def _freeze(self, frozen_stages: int) -> None:
        if frozen_stages < 0:
            return
        if frozen_stages > len(self.strides):
            raise DenseBackboneError(f"frozen_stages={frozen_stages} but backbone '{self.name}' returns only "
                                     f"{len(self.strides)} maps (use -1 to train all, 0..{len(self.strides)})")
        params = list(self.body.named_parameters())
        if frozen_stages == 0:
            first = self.body.feature_info.module_name()[0]
            # The stem is everything registered before the first returned stage.
            stop = next(i for i, (n, _) in enumerate(params) if _in_module(n, first))
        else:
            last = self.body.feature_info.module_name()[frozen_stages - 1]
            stop = max(i for i, (n, _) in enumerate(params) if _in_module(n, last)) + 1
        for _, p in params[:stop]:
            p.requires_grad_(False)
        self._frozen = [m for m in self.body.modules() if any(not p.requires_grad for p in m.parameters(False))]

    def train(self, mode: bool = True) -> DenseBackbone:
        """Frozen stages stay in eval mode, so their BatchNorm statistics do not drift."""
        super().train(mode)
        for m in getattr(self, "_frozen", []):
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((str(i), f) for i, f in enumerate(self.body(x)))


def _classifier_size(name: str, path: str | os.PathLike, kwargs: dict[str, Any]) -> int:
    """The class count of the classifier stored in ``path`` (a CIFAR-10 classifier initialises a detector
    backbone as well as an ImageNet one): the output size of the checkpoint's classifier weight."""
    from lowformer.checkpoints import (
        _checkpoint_filter,
        extract_state_dict,
        read_checkpoint,
    )
    model = create_model(name, **kwargs)
    state = extract_state_dict(read_checkpoint(path), path)
    filter_fn = _checkpoint_filter(model)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except (KeyError, RuntimeError, ValueError, IndexError):
            return model.num_classes  # load_checkpoint reports the layout problem in its own words
    own = dict(model.named_parameters())
    classifier = model.get_classifier()
    for pname, p in own.items():
        if classifier is not None and any(p is q for q in classifier.parameters()) and pname in state \
                and p.dim() >= 2:
            return int(state[pname].shape[0])
    return model.num_classes


def _in_module(param_name: str, module: str) -> bool:
    """Whether a parameter of the feature wrapper belongs to the model's ``module`` (timm's wrappers name
    the submodule ``stages.1`` either as is, as ``stages_1`` or under ``model.``)."""
    for form in (module, module.replace(".", "_"), "model." + module):
        if param_name.startswith(form + "."):
            return True
    return False


def create_backbone(name: str, **kwargs: Any) -> DenseBackbone:
    """Build a :class:`DenseBackbone` (see its arguments)."""
    return DenseBackbone(name, **kwargs)
