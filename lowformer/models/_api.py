"""timm's model API, written once for every family: ``stem -> stages -> norm -> global_pool -> head_drop -> head``.

``FeatureTaps`` holds the part that walks the stages (``forward_intermediates``, ``prune_intermediate_layers``);
it also serves the families kept as timm's classes (LowFormer, Visformer V1), which only add feature taps.
``StagedModel`` adds the rest of the API (features, head, classifier access and reset, gradient checkpointing,
parameter groups) for the families implemented here.

Feature taps are numbered along the maps the network produces: position 0 is the stem output, position
``i + 1`` the output of stage ``i``; ``feature_info[0]`` sits at position ``first_tap`` (0 where the stem is a
tap, as FAT's or with ``stride2_feature``, 1 where the taps start at the first stage, 2 where the first stage
is skipped too, as EdgeFormer's stride-2 stage). A family whose parts carry other names (kept for their
state-dict keys) overrides the small hooks: ``forward_stem``, ``forward_norm``, ``_stage_count``,
``_run_stage``, ``_keep_stages``, ``_remove_head``.
"""
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, SelectAdaptivePool2d, get_device_dtype, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq

__all__ = ["ClassifierHeadModel", "FeatureTaps", "StagedModel", "init_linear"]


def init_linear(m: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear weights, zero bias: the usual transformer init, for ``apply``."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class FeatureTaps:
    """``forward_intermediates`` and ``prune_intermediate_layers`` over stem, stages and final norm.

    Expects ``feature_info``, ``first_tap``, ``grad_checkpointing``, ``num_features`` / ``head_hidden_size``
    and the hooks below (their defaults address ``stem``, an ``nn.Sequential`` ``stages`` and ``norm``)."""

    first_tap: int = 1
    norm_name: Optional[str] = "norm"  # the module after the last stage, None where there is none
    # False where that module is not a norm but changes the width (EdgeFormer's final conv): ``norm=True``
    # leaves the taps alone and ``prune_norm`` keeps it; only pruning the stage that feeds it removes it
    norm_taps: bool = True

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def _stage_count(self) -> int:
        return len(self.stages)

    def _run_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        stage = self.stages[index]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(stage, x)
        return stage(x)

    def _keep_stages(self, count: int) -> None:
        self.stages = self.stages[:count]

    def _remove_head(self) -> None:
        # the pooling stays: a pruned classifier gives the last kept stage's pooled features
        self.reset_classifier(0)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Maps at the ``feature_info`` taps and, unless ``intermediates_only``, the final features.

        Args:
            x: input images.
            indices: the last n taps if int, all if None, these tap indices if a sequence.
            norm: apply the final norm to the last tap's map (where the final layer is a norm).
            stop_early: stop after the stage of the last requested tap.
            output_fmt: only 'NCHW'.
            intermediates_only: return only the intermediates.
        """
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last_tap = len(self.feature_info) - 1
        num_stages = self._stage_count()
        run = num_stages
        if stop_early and not torch.jit.is_scripting():
            run = min(max(max_index + self.first_tap, 0), num_stages)
        normed = norm and self.norm_taps and self.norm_name is not None
        intermediates = []
        x = self.forward_stem(x)
        if self.first_tap == 0 and 0 in take_indices:
            intermediates.append(x)
        for i in range(run):
            x = self._run_stage(i, x)
            tap = i + 1 - self.first_tap
            if tap in take_indices:
                intermediates.append(self.forward_norm(x) if normed and tap == last_tap else x)
        if intermediates_only:
            return intermediates
        if run == num_stages and self.norm_name is not None:
            x = self.forward_norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last of ``indices``, and the norm and head when asked or when they lost
        their input (the head then gives the last kept stage's pooled features)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        keep = max(max_index + self.first_tap, 0)
        prune_end = keep < self._stage_count()
        self._keep_stages(keep)
        if prune_end:  # norm and head were sized for the last stage
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if self.norm_name is not None and (prune_end or (prune_norm and self.norm_taps)):
            setattr(self, self.norm_name, nn.Identity())
        if prune_head or prune_end:
            self._remove_head()
        return take_indices


class StagedModel(FeatureTaps, nn.Module):
    """Base class of the project's families: the whole timm API over ``stem``, ``stages`` (an
    ``nn.Sequential``), ``norm``, then ``_init_head``'s ``global_pool``, ``head_drop`` and ``head``.

    A family with more head than pool, dropout and a linear layer overrides ``_make_head`` (the classifier
    ``reset_classifier`` builds) and ``forward_head``; ``pool_flatten = False`` keeps the pooled map 4-D
    where the head applies convs to it."""

    pool_flatten: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.feature_info: List[Dict[str, Any]] = []

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float,
                   head_hidden_size: Optional[int] = None, **dd: Any) -> None:
        """Pooling, dropout and classifier after the stages (registered last: timm's feature wrappers run
        children in registration order)."""
        self.num_classes = num_classes
        self.num_features = num_features
        self.head_hidden_size = num_features if head_hidden_size is None else head_hidden_size
        self.global_pool = self._make_pool(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(self.head_hidden_size, num_classes, **dd)

    def _make_pool(self, global_pool: str) -> SelectAdaptivePool2d:
        # no pooling ('') keeps the 4-D map, as timm's heads do
        return SelectAdaptivePool2d(pool_type=global_pool, flatten=self.pool_flatten and bool(global_pool))

    def _make_head(self, in_features: int, num_classes: int, **dd: Any) -> nn.Module:
        return nn.Linear(in_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^stem|^patch_embed", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.(downsample|pos_embed)", (0,)),
            (r"^stages\.(\d+)\.\w*blocks\.(\d+)", None),
            (rf"^{self.norm_name}", (99999,)),
        ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self._make_pool(global_pool)
        self.head = self._make_head(self.head_hidden_size, num_classes, **get_device_dtype(self))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.forward_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ClassifierHeadModel(StagedModel):
    """A ``StagedModel`` whose head is timm's ``ClassifierHead`` (pool, dropout and ``head.fc`` in one module,
    the layout of the families' checkpoints)."""

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float,
                   **dd: Any) -> None:
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.head = ClassifierHead(num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)
