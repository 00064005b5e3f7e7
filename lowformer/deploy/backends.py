"""The one backend layer: a table of :class:`Backend` objects, each turning a model into a callable on a fixed input.

``lowformer bench``, the benchmark scripts and the deploy paths all go through this table. A backend's
``prepare(model, x, threads, options)`` returns a :class:`Runner` (``runner()`` does one forward pass on ``x``);
:func:`prepare` adds what every backend shares: the reference output of the eager model, the one output check
(:func:`lowformer.deploy.check.verify_outputs`, exact backends by max |diff|, lossy ones recorded by cosine) and
the record of what was prepared.

``owns_threads`` marks a runtime that fixes its thread count when the runner is created (an ONNX Runtime
session): a thread sweep prepares it once per thread count. The others are PyTorch, whose threads the timing
sets around each measurement (``lowformer.bench.timing``), so one runner serves every thread count.

A new backend plugs in with :func:`register_backend` (a duplicate name is refused).
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from lowformer.deploy.check import OutputMismatchError, verify_outputs
from lowformer.deploy.onnx import OPSET, check_opset
from lowformer.errors import LowformerError

__all__ = ["Backend", "BackendOptions", "Runner", "Prepared", "BACKENDS", "AMP_DTYPES", "OutputMismatchError",
           "register_backend", "get_backend", "backend_names", "prepare", "check_amp", "check_device", "onnx_cache_dir",
           "parse_device"]

_logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# max |backend - eager| <= RTOL x max |eager| for the exact backends: looser than deploy's 1e-4, because
# TorchScript's and ONNX Runtime's kernels sum in other orders; under autocast the reference is itself low precision
RTOL = {None: 1e-3, "amp": 5e-2}


@dataclass
class BackendOptions:
    """What some backends need beyond (model, x, threads): autocast dtype (PyTorch backends), ONNX opset and
    cache (ONNX backends), calibration images (int8; default: the timed input itself, as speed does not
    depend on them)."""
    amp: str | None = None
    opset: int | None = None
    cache_dir: Path | None = None
    cache_key: str | None = None
    calibration: torch.Tensor | None = None


@dataclass
class Runner:
    """A prepared backend: ``runner()`` runs one inference on the prepared input; ``info`` says what was prepared
    (ONNX file, opset, session threads, deploy passes)."""
    fn: Callable[[], Any]
    info: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> Any:
        return self.fn()


@dataclass(frozen=True)
class Backend:
    """One row of the table.

    Attributes:
        name: the ``--backend`` name.
        prepare: ``prepare(model, x, threads, options) -> Runner``; ``model`` is in eval mode on ``x``'s device.
        lossy: computes in lower precision (bf16, int8): outputs are compared by cosine and recorded, not refused.
        owns_threads: the runner fixes its thread count when created (prepare once per thread count).
        opset: the ONNX opset it exports with by default (None: no ONNX).
        amp: honours ``--amp`` (autocast around the PyTorch forward).
        devices: the device types it runs on.
        summary: one line for ``--help``.
    """
    name: str
    prepare: Callable[[nn.Module, torch.Tensor, int, BackendOptions], Runner]
    lossy: bool = False
    owns_threads: bool = False
    opset: int | None = None
    amp: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")
    summary: str = ""


BACKENDS: dict[str, Backend] = {}


def add_unique(table: dict[str, Any], name: str, item: Any, what: str) -> Any:
    """``table[name] = item`` for the deploy layer's tables (backends, export formats); a name already taken is
    refused, so a plug-in cannot silently replace a row."""
    if name in table:
        raise ValueError(f"{what} '{name}' is already registered")
    table[name] = item
    return item


def register_backend(backend: Backend) -> Backend:
    """Add ``backend`` to the table; a name already taken is refused."""
    return add_unique(BACKENDS, backend.name, backend, "backend")


def backend_names() -> list[str]:
    """The registered backend names, in registration order."""
    return list(BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; one LowformerError listing the others if there is none."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise LowformerError(f"unknown backend '{name}': use one of {', '.join(BACKENDS)}") from None


def parse_device(device: str) -> torch.device:
    """``device`` as a torch.device that exists here, or one LowformerError naming the choices."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise LowformerError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise LowformerError(f"device '{device}' is not supported here: use cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise LowformerError(f"device '{device}' given but no CUDA device is visible; use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise LowformerError(f"device '{device}': there are only {torch.cuda.device_count()} CUDA device(s) "
                                 f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return parsed


def onnx_cache_dir() -> Path:
    """Where exported ONNX files are kept: ``$LOWFORMER_CACHE/onnx`` or ``~/.cache/lowformer/onnx``."""
    root = os.environ.get("LOWFORMER_CACHE") or Path.home() / ".cache" / "lowformer"
    return Path(root) / "onnx"


def check_device(device: torch.device, backend: str) -> None:
    """Refuse a backend on a device type it does not run on, before anything is built."""
    devices = get_backend(backend).devices
    if device.type not in devices:
        raise LowformerError(f"the {backend} backend runs on {' or '.join(devices)}, not {device.type}: use "
                             f"--device {devices[0]} or another --backend")


def check_amp(device: torch.device, amp: str | None, backend: str) -> None:
    """Refuse AMP settings the device or backend cannot honour, instead of timing fp32 under an AMP label."""
    if amp is None:
        return
    if amp not in AMP_DTYPES:
        raise LowformerError(f"unknown --amp '{amp}': use one of {', '.join(AMP_DTYPES)}")
    if not get_backend(backend).amp:
        amp_backends = ", ".join(b.name for b in BACKENDS.values() if b.amp)
        lossy = " or ".join(b.name for b in BACKENDS.values() if b.lossy)
        raise LowformerError(f"--amp applies to the {amp_backends} backends; {backend} sets its own precision "
                             f"(use {lossy})")
    if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise LowformerError(f"{torch.cuda.get_device_name(device)} does not support bf16; use --amp fp16")


def _autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def _first_output(out: Any) -> torch.Tensor:
    """The tensor to compare: the first of a tuple / list / dict output, on the CPU (an ORT value copied back)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor):
        out = torch.from_numpy(out.numpy() if hasattr(out, "numpy") else out)
    return out.detach().float().cpu()


@dataclass
class Prepared:
    """A backend ready to time: ``run()`` does one forward pass; ``check`` is the output comparison with eager."""
    backend: str
    run: Runner
    check: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def max_abs_diff(self) -> float:
        return self.check["max_abs_diff"]


def prepare(model: nn.Module, backend: str, x: torch.Tensor, threads: int = 1, amp: str | None = None,
            opset: int | None = None, cache_key: str | None = None, cache_dir: Path | None = None,
            calibration: torch.Tensor | None = None) -> Prepared:
    """``backend``'s runner for ``model`` (eval mode, on ``x``'s device), checked against the eager model on ``x``.

    Exact backends raise OutputMismatchError beyond ``RTOL``; lossy ones record their difference and cosine.
    ``cache_key`` names the model in ONNX cache files (the weights' digest is added, so a file exported from
    other weights is never reused)."""
    spec = get_backend(backend)
    check_device(x.device, backend)
    check_amp(x.device, amp, backend)
    if opset is not None:
        check_opset(opset)
    options = BackendOptions(amp=amp, opset=opset if opset is not None else spec.opset, cache_dir=cache_dir,
                             cache_key=cache_key or type(model).__name__, calibration=calibration)
    with torch.inference_mode(), _autocast(x.device, amp):
        reference = _first_output(model(x))
    runner = spec.prepare(model, x, threads, options)
    output = _first_output(runner())
    check = verify_outputs(lambda _: reference, lambda _: output, [x], f"the {backend} backend",
                           rtol=None if spec.lossy else RTOL["amp" if amp else None],
                           hint="time this model with another backend")
    return Prepared(backend, runner, check, dict(runner.info))


# --- PyTorch backends -------------------------------------------------------------------------------------------

def _pytorch_runner(module: Callable[[torch.Tensor], Any], x: torch.Tensor, amp: str | None,
                    info: dict[str, Any] | None = None) -> Runner:
    def run() -> Any:
        with torch.inference_mode(), _autocast(x.device, amp):
            return module(x)
    return Runner(run, info or {})


def _eager(model: nn.Module, x: torch.Tensor, threads: int, options: BackendOptions) -> Runner:
    return _pytorch_runner(model, x, options.amp)


def _channels_last_copy(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """A copy of ``model`` and ``x`` in channels-last memory format (the caller's model is left as it is)."""
    import copy
    return copy.deepcopy(model).to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)


def _channels_last(model: nn.Module, x: torch.Tensor, threads: int, options: BackendOptions) -> Runner:
    return _pytorch_runner(*_channels_last_copy(model, x), options.amp)


def _torchscript(model: nn.Module, x: torch.Tensor, threads: int, options: BackendOptions) -> Runner:
    with torch.no_grad(), _autocast(x.device, options.amp), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still the original's --optit
        traced = torch.jit.trace(model, x, check_trace=False)
        scripted = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    return _pytorch_runner(scripted, x, options.amp)


def _compile(model: nn.Module, x: torch.Tensor, threads: int, options: BackendOptions) -> Runner:
    return _pytorch_runner(torch.compile(model), x, options.amp)


def _cuda_graphs(model: nn.Module, x: torch.Tensor, threads: int, options: BackendOptions) -> Runner:
    """The channels-last module captured once in a CUDA graph and replayed on the prepared input (a static
    buffer, as a server would copy each batch into): one launch for the whole forward, where per-kernel launch
    cost dominates small batches on a fast GPU."""
    module, static = _channels_last_copy(model, x)
    static = static.clone()  # the graph's own input buffer, whatever the caller does with x
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side), torch.inference_mode(), _autocast(x.device, options.amp):
        for _ in range(3):  # outside the graph: cuDNN chooses its algorithms and the allocator settles first
            module(static)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), _autocast(x.device, options.amp), torch.cuda.graph(graph):
        out = module(static)

    def run() -> Any:
        graph.replay()
        return out
    return Runner(run, {"memory_format": "channels_last", "cuda_graph": True})


def _tensorrt(model: nn.Module, x: torch.Tensor, threads: int, options: BackendOptions) -> Runner:
    """Torch-TensorRT's dynamo path on a copy of the module in the ``--amp`` dtype (fp32 without), so the engine
    is typed by its weights and input rather than by version-specific precision flags."""
    import copy
    try:
        import torch_tensorrt
    except ImportError:
        raise LowformerError("the tensorrt backend needs torch-tensorrt built for this torch "
                             f"({torch.__version__}): pip install torch-tensorrt") from None
    dtype = AMP_DTYPES[options.amp] if options.amp else torch.float32
    module = copy.deepcopy(model).to(dtype)
    typed = x.to(dtype)
    engine = torch_tensorrt.compile(module, ir="dynamo", inputs=[typed])

    def run() -> Any:
        with torch.inference_mode():
            return engine(typed)
    return Runner(run, {"tensorrt": torch_tensorrt.__version__, "dtype": str(dtype).removeprefix("torch.")})


def _deploy(model: nn.Module, x: torch.Tensor, threads: int, options: BackendOptions, precision: str) -> Runner:
    """``lowformer.deploy``: weights pre-packed for, and checked at, the timed shape. bf16 accepts any cosine here
    (timing does not depend on it); :func:`prepare` records it."""
    from lowformer.deploy import deploy
    module = deploy(model, x, precision=precision, min_cosine=-1.0 if precision != "fp32" else None)
    return _pytorch_runner(module, x, None, {"deploy_passes": " ".join(module.report.get("passes", []))})


# --- ONNX Runtime backends --------------------------------------------------------------------------------------

def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


@functools.cache
def _code_digest() -> str:
    """The installed lowformer source and the exporting libraries' versions: an export made by other code (a
    changed deploy pass, a newer torch) may still be correct but is not the graph this code would time."""
    import timm

    h = hashlib.sha1(f"{torch.__version__} {timm.__version__}".encode())
    root = Path(__file__).resolve().parents[1]
    for source in sorted(root.rglob("*.py")):
        h.update(str(source.relative_to(root)).encode())
        h.update(source.read_bytes())
    return h.hexdigest()[:8]


def cached_export(graph: nn.Module, reference: nn.Module, x: torch.Tensor, options: BackendOptions,
                   variant: str) -> Path:
    """The ONNX file of ``graph`` in the cache, exported (and checked against ``reference``) once per
    (model, weights, input size, opset, variant, exporting code). A new export removes the same model's
    exports made by other code, which this code never reads again, so the cache does not grow per change."""
    from lowformer.deploy.onnx import export_onnx
    size = "x".join(str(s) for s in x.shape[2:])
    opset = options.opset or OPSET
    stem = f"{options.cache_key}{variant}_{size}_opset{opset}_{_weights_digest(reference)}"
    path = (options.cache_dir or onnx_cache_dir()) / f"{stem}_{_code_digest()}.onnx"
    if not path.exists():
        _logger.info("exporting %s to %s", options.cache_key, path)
        export_onnx(graph, path, x[:1].cpu(), reference=reference, rtol=RTOL[None], opset=opset)
        for stale in path.parent.glob(f"{glob.escape(stem)}_{'[0-9a-f]' * 8}.onnx"):
            if stale != path:
                stale.unlink(missing_ok=True)
    return path


def _ort_runner(path: Path | bytes, x: torch.Tensor, threads: int, info: dict[str, Any]) -> Runner:
    """A session with ``threads`` intra-op threads on ``x``: IO-bound on CUDA, numpy on the CPU. ``info`` names
    the ONNX file without its folder, so records written to results carry no machine paths."""
    import numpy as np

    from lowformer.deploy.onnx import ort_session
    session = ort_session(path, threads, x.device)
    info = {**info, "session_threads": session.get_session_options().intra_op_num_threads}
    if x.device.type == "cuda":
        binding = session.io_binding()
        binding.bind_input("input", "cuda", x.device.index or 0, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output("output", "cuda", x.device.index or 0)

        def run() -> Any:
            session.run_with_iobinding(binding)
            return binding.get_outputs()[0]
        return Runner(run, info)
    feed = {session.get_inputs()[0].name: x.detach().cpu().float().contiguous().numpy()}
    return Runner(lambda: session.run(None, feed)[0], info)


def _onnxruntime(model: nn.Module, x: torch.Tensor, threads: int, options: BackendOptions) -> Runner:
    path = cached_export(model, model, x, options, "")
    return _ort_runner(path, x, threads, {"onnx_file": path.name, "opset": options.opset})


def _onnxruntime_deploy(model: nn.Module, x: torch.Tensor, threads: int, options: BackendOptions) -> Runner:
    from lowformer.deploy.onnx import portable_deploy
    path = cached_export(portable_deploy(model.cpu(), x[:1].cpu()), model, x, options, "_deploy")
    model.to(x.device)
    return _ort_runner(path, x, threads, {"onnx_file": path.name, "opset": options.opset})


def _onnxruntime_int8(model: nn.Module, x: torch.Tensor, threads: int, options: BackendOptions) -> Runner:
    """int8 calibrated on ``options.calibration``, by default the timed input itself: speed does not depend on the
    calibration data (accuracy: ``benchmarks/deploy_cpu.py --accuracy``). Nothing is left on disk."""
    from lowformer.deploy.onnx import deploy_int8
    calibration = options.calibration if options.calibration is not None else x
    opset = options.opset or OPSET
    module = deploy_int8(model, x[:1], calibration, threads=threads, min_cosine=-1.0, opset=opset)
    info = {"session_threads": module.threads, "opset": opset,
            "int8_cosine": module.report["check"]["min_cosine"]}

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return module(x)
    return Runner(run, info)


def _openvino_backends() -> list[Backend]:
    """OpenVINO (imported when prepared) on the plain export, the anchor to beat, and on the deploy export."""
    from lowformer.deploy.openvino import openvino_backend
    rows = []
    for graph, prefix in ((False, "openvino"), (True, "openvino-deploy")):
        for precision in ("fp32", "bf16", "int8"):
            name = prefix if precision == "fp32" else f"{prefix}-{precision}"
            what = {"fp32": "fp32", "bf16": "bf16 (inference-precision hint)", "int8": "NNCF int8"}[precision]
            rows.append(Backend(name, openvino_backend(precision, graph), lossy=precision != "fp32",
                                owns_threads=True, opset=OPSET, devices=("cpu",),
                                summary=f"OpenVINO {what} on the {'deploy' if graph else 'plain'} export"))
    return rows


for _backend in (
    Backend("eager", _eager, amp=True, summary="the PyTorch module as built"),
    Backend("channels_last", _channels_last, amp=True, summary="the module and input in channels-last memory format"),
    Backend("torchscript", _torchscript, amp=True,
            summary="trace, freeze, optimize_for_inference (the original's --optit)"),
    Backend("compile", _compile, amp=True, summary="torch.compile"),
    Backend("cuda-graphs", _cuda_graphs, amp=True, devices=("cuda",),
            summary="the channels-last module replayed as one CUDA graph"),
    # TensorRT chooses its kernels (TF32, fp16) itself: outputs are compared by cosine, not refused
    Backend("tensorrt", _tensorrt, lossy=True, amp=True, devices=("cuda",),
            summary="Torch-TensorRT (dynamo) engine in the --amp dtype"),
    Backend("onnxruntime", _onnxruntime, owns_threads=True, opset=OPSET,
            summary="ONNX Runtime on the plain export (the original's --onnxrun)"),
    Backend("deploy", functools.partial(_deploy, precision="fp32"), summary="lowformer.deploy's PyTorch graph, fp32"),
    Backend("deploy-bf16", functools.partial(_deploy, precision="bf16"), lossy=True,
            summary="lowformer.deploy's graph in bf16"),
    Backend("onnxruntime-deploy", _onnxruntime_deploy, owns_threads=True, opset=OPSET,
            summary="ONNX Runtime on the export of the deploy graph"),
    Backend("onnxruntime-int8", _onnxruntime_int8, lossy=True, owns_threads=True, opset=OPSET, devices=("cpu",),
            summary="ONNX Runtime int8 static quantization of the deploy graph"),
    *_openvino_backends(),
):
    register_backend(_backend)
