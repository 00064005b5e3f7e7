"""``lowformer.deploy(model)``: an inference-only model computing the same function, faster.

The pipeline (style spec section 2): deep-copy; timm's ``reparameterize_model`` walk for the blocks that declare
``fuse()`` / ``reparameterize()``; one fx trace; the named passes of :mod:`lowformer.deploy.passes`, each a
pure GraphModule rewrite; channels-last memory format; pre-packed oneDNN weights; then a check against the eager
model that raises on mismatch. A model fx cannot trace still gets the re-parameterisation and memory format.
Low precision: ``bf16`` casts the deployed graph; ``int8`` is ONNX Runtime static quantization calibrated on
real images (:mod:`lowformer.deploy.onnx`). ``runtime="openvino"`` runs the deploy export in OpenVINO
(:mod:`lowformer.deploy.openvino`); ``precision="auto"`` picks the fastest accurate path (:mod:`lowformer.deploy.auto`).
"""
from __future__ import annotations

import logging
import sys
import types
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from timm.utils import reparameterize_model

from lowformer.deploy.check import DEFAULT_RTOL, DeployMismatchError, count_norms, verify_outputs
from lowformer.deploy.cpu import cpu_features
from lowformer.deploy.fold import fold_input_size, needs_input_size_folding
from lowformer.deploy.graph import trace
from lowformer.deploy.modules import MkldnnConv2d, MkldnnLinear, mkldnn_available
from lowformer.deploy.passes import CPU_PASSES, PASSES, PORTABLE_PASSES, default_passes, propagate_shapes
from lowformer.errors import LowformerError

__all__ = ["deploy", "reparameterize", "DeployedModel", "DeployMismatchError", "PRECISIONS", "RUNTIMES",
           "default_input", "PASSES", "PORTABLE_PASSES", "CPU_PASSES"]

_logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
RUNTIMES = ("pytorch", "openvino")
# the lowest cosine to the eager fp32 outputs a low-precision deployment may reach by default (the target)
MIN_COSINE = {"bf16": 0.99, "int8": 0.99}


class DeployedModel(nn.Module):
    """The deployed graph plus what the caller must not forget: input memory format and dtype.

    ``report`` records the passes applied (so a benchmark figure says what "deploy" meant), whether fx traced
    the model, the norm layers before and after, and the check result."""

    def __init__(self, module: nn.Module, channels_last: bool, dtype: torch.dtype, report: dict[str, Any]) -> None:
        super().__init__()
        self.module = module
        self.channels_last = channels_last
        self.dtype = dtype
        self.report = report

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.module(x.to(self.dtype))
        return out.float() if self.dtype != torch.float32 else out


def default_input(model: nn.Module, batch_size: int = 1) -> torch.Tensor:
    """A random input at the model's paper resolution (its ``pretrained_cfg['input_size']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return torch.randn(batch_size, *cfg.get("input_size", (3, 224, 224)))


def reparameterize(model: nn.Module) -> nn.Module:
    """timm's ``reparameterize_model`` walk (``fuse()`` / ``reparameterize()`` / ``switch_to_deploy()``) on a
    deep copy; the model passed in is left as it is."""
    return reparameterize_model(model, inplace=False)


def _apply_passes(gm: fx.GraphModule, passes: dict, applied: list[str]) -> fx.GraphModule:
    for name, fn in passes.items():
        try:
            gm = fn(gm)
            applied.append(name)
        except Exception as e:  # noqa: BLE001 - a pass that cannot handle this graph is skipped, not fatal
            _logger.warning("deploy pass %s skipped for %s: %s", name, type(gm).__name__, e)
    return gm


def deploy(
        model: nn.Module,
        example_input: torch.Tensor | None = None,
        precision: str = "fp32",
        calibration: Iterable[torch.Tensor] | torch.Tensor | None = None,
        passes: Iterable[str] | None = None,
        verify: bool = True,
        min_cosine: float | None = None,
        runtime: str = "pytorch",
        accuracy_control: bool = False,
        threads: int | None = None,
) -> nn.Module:
    """An inference-only copy of ``model`` that computes the same function faster on the CPU.

    Args:
        model: any model in eval mode (a model in training mode is refused: BatchNorm folding and dropout
            removal would change what it computes).
        example_input: input used for shapes (weight pre-packing) and the final check; default: a random
            batch of one at the model's paper resolution.
        precision: ``fp32`` (max |diff| <= 1e-4 x max |output|), ``bf16`` (cast graph; fast only on CPUs
            with native bf16), or ``int8`` (ONNX Runtime static quantization; needs ``calibration``).
        calibration: images (a tensor N x C x H x W or an iterable of batches), preprocessed as for
            evaluation; used by ``int8`` only.
        passes: names of passes to run (default: ``default_passes()``, all of ``PASSES`` that pay on this CPU).
        verify: compare with the eager model on ``example_input`` (int8: on the first calibration batches) and
            raise DeployMismatchError on mismatch.
        min_cosine: for bf16 / int8, the lowest per-sample cosine to the eager outputs accepted (default
            ``MIN_COSINE[precision]``, 0.99); -1 accepts any result, which ``report['check']`` still records.
            For ``auto``, the gate every candidate must pass.
        runtime: ``pytorch`` (the rewritten graph; int8 runs in ONNX Runtime) or ``openvino`` (OpenVINO on the
            deploy export: fp32, bf16 inference precision, NNCF int8 calibrated on ``calibration``).
            ``precision="auto"`` chooses the runtime itself.
        accuracy_control: ``runtime="openvino"``, int8: NNCF's accuracy-aware quantization, keeping layers in
            float until the cosine drop on the calibration images is at most ``1 - min_cosine``.
        threads: threads of the ONNX Runtime / OpenVINO sessions and of ``auto``'s timing (default: PyTorch's).

    ``precision="auto"`` (:mod:`lowformer.deploy.auto`) builds the paths this CPU can run (bf16 only with native
    bf16, int8 only with ``calibration``), times them briefly on ``example_input`` and returns the fastest whose
    cosine to the eager outputs on the calibration images (else ``example_input``) reaches ``min_cosine``;
    ``module.report`` says which runtime and precision, every candidate's time and cosine, the CPU flags and why.
    """
    if model.training:
        raise LowformerError("deploy() needs a model in eval mode: call model.eval() first (BatchNorm folding "
                             "and dropout removal change what a model in training mode computes)")
    if precision not in PRECISIONS + ("auto",):
        raise LowformerError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)} or auto")
    if runtime not in RUNTIMES:
        raise LowformerError(f"unknown runtime '{runtime}': choose one of {', '.join(RUNTIMES)}")
    if accuracy_control and (runtime != "openvino" or precision != "int8"):
        raise LowformerError("accuracy_control=True is NNCF's accuracy-aware int8: use it with runtime='openvino' "
                             "and precision='int8'")
    if example_input is None:
        example_input = default_input(model)
    if precision == "auto":
        from lowformer.deploy.auto import deploy_auto
        return deploy_auto(model, example_input, calibration, min_cosine=0.99 if min_cosine is None else min_cosine,
                           threads=threads)
    if runtime == "openvino":
        from lowformer.deploy.openvino import deploy_openvino
        return deploy_openvino(model, example_input, precision, calibration, threads or torch.get_num_threads(),
                               deploy_graph=True, accuracy_control=accuracy_control, verify=verify,
                               min_cosine=MIN_COSINE.get(precision) if min_cosine is None else min_cosine)
    names = default_passes() if passes is None else list(passes)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise LowformerError(f"unknown deploy pass(es) {unknown}: available {list(PASSES)}")
    if min_cosine is None:
        min_cosine = MIN_COSINE.get(precision)
    if precision == "int8":
        from lowformer.deploy.onnx import deploy_int8
        return deploy_int8(model, example_input, calibration, passes=[n for n in names if n in PORTABLE_PASSES],
                           verify=verify, min_cosine=min_cosine)

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # oneDNN reports bf16 "supported" on any AVX-512 CPU, where it is emulated: native needs the CPU's bf16 flag too
    native = dtype == torch.float32 or (cpu_features().bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not native:
        _logger.warning("this CPU has no native bf16 instructions: bf16 runs emulated (slower than fp32) "
                        "and without the oneDNN passes")
    report: dict[str, Any] = {"precision": precision, "norms_before": count_norms(model)}
    applied = ["reparameterize"]
    module = fold_input_size(reparameterize(model), example_input, fixed_size=False).eval()
    if needs_input_size_folding(model):
        applied.append("fold_input_size")
    try:
        gm = trace(module)
        report["traced"] = True
    except Exception as e:  # noqa: BLE001 - untraceable models keep module-level rewrites only
        _logger.warning("fx cannot trace %s (%s): deploying with re-parameterisation and memory format only",
                        type(model).__name__, e)
        gm, report["traced"] = None, False
    channels_last = example_input.dim() == 4
    if gm is not None:
        gm = _apply_passes(gm, {n: PORTABLE_PASSES[n] for n in names if n in PORTABLE_PASSES}, applied)
        if dtype != torch.float32:
            gm = gm.to(dtype)
        if native and mkldnn_available() and example_input.device.type == "cpu":
            x = example_input.to(dtype)
            gm = propagate_shapes(gm, x.contiguous(memory_format=torch.channels_last) if channels_last else x)
            gm = _apply_passes(gm, {n: CPU_PASSES[n] for n in names if n in CPU_PASSES}, applied)
            for m in gm.modules():
                if isinstance(m, (MkldnnConv2d, MkldnnLinear)):
                    m.prepack()
        module = gm
    elif dtype != torch.float32:
        module = module.to(dtype)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    report.update(passes=applied, norms_after=count_norms(module), channels_last=channels_last)
    deployed = DeployedModel(module, channels_last, dtype, report).eval()
    if verify:
        try:
            report["check"] = _verify(model, deployed, example_input, precision, min_cosine)
        except DeployMismatchError:
            if gm is not None or not channels_last:
                raise
            # Untraced, the memory format is the only change; an ill-conditioned network (sharp attention under
            # random weights, e.g. Visformer v2) can amplify its different summation order past the tolerance.
            _logger.warning("channels-last changes %s's outputs beyond the tolerance: keeping the contiguous format",
                            type(model).__name__)
            report["channels_last"] = False
            deployed = DeployedModel(module.to(memory_format=torch.contiguous_format), False, dtype, report).eval()
            report["check"] = _verify(model, deployed, example_input, precision, min_cosine)
    return deployed


def _verify(model: nn.Module, deployed: nn.Module, example_input: torch.Tensor, precision: str,
            min_cosine: float | None) -> dict[str, Any]:
    return verify_outputs(model, deployed, [example_input], f"deploy({type(model).__name__}, precision={precision})",
                          rtol=DEFAULT_RTOL if precision == "fp32" else None, min_cosine=min_cosine)


class _CallablePackage(types.ModuleType):
    """``lowformer.deploy(model)`` stays the public call while ``lowformer.deploy`` remains the package, so its
    submodules import as ``import lowformer.deploy.onnx`` (a function of that name would shadow them)."""

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        return deploy(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
