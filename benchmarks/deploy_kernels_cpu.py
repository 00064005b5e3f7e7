"""Why the deploy targets stop where they do: LowFormer's convolution shapes, kernel by kernel, on this CPU.

Three measurements, each interleaved in rounds in one process (one thread), as ``deploy_cpu.py`` does for whole
models, so a change in machine load hits every candidate alike:

* ``fp32``: residual chains shaped like LowFormer's blocks (1x1 expand, activation, 1x1 project, + input; and the
  3x3 FusedMBConv), enough of them that the weights stream from memory as inside a model. Candidates: ONNX Runtime
  (MLAS), the deploy module's kernel (oneDNN convolution with pre-packed weights and fused post-ops), oneDNN
  matmul (``mkldnn._linear_pointwise``, pre-packed) and MKL packed sgemm (``mkl._mkl_linear``) on the NHWC view.
* ``int8``: ONNX Runtime fp32 against int8 (static QDQ, 7-bit weights as ``lowformer.deploy`` uses on a CPU
  without VNNI) for single convolution classes, several in parallel so the weights stream: the ceiling of the
  low-precision path before any glue between the convolutions.
* ``overhead``: a tiny convolution through each call path, which is almost all per-call cost.
* ``model``: whole models (``--models``, batch 1, 224x224), time per kernel class (1x1, k x k, depthwise and
  transposed convolutions, attention, head, the rest) from each runtime's own profiler, summed over
  ``--profile-runs`` calls: the deploy module under ``torch.profiler``, ONNX Runtime on the plain export under its
  session profiler; plus both un-profiled, interleaved, as the whole-model reference. The deploy module is also
  timed without its ``pointwise_matmul`` pass (1x1 convolutions as oneDNN convolutions), to show what it gives.

    python benchmarks/deploy_kernels_cpu.py              # all four, a few minutes
    python benchmarks/deploy_kernels_cpu.py --only fp32
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowformer.bench.timing import environment, interleave, summarize  # noqa: E402
from lowformer.deploy import deploy  # noqa: E402
from lowformer.deploy.onnx import OrtModule, cpu_has_vnni, export_onnx, ort_session, quantize_int8  # noqa: E402
from lowformer.deploy.passes import default_passes  # noqa: E402
from lowformer.files import atomic_output  # noqa: E402
from lowformer.models import create_model  # noqa: E402

_logger = logging.getLogger("deploy_kernels_cpu")
RESULTS = Path(__file__).resolve().parent / "results"
ACTIVATIONS = {"hardswish": (nn.Hardswish, F.hardswish), "gelu": (nn.GELU, F.gelu)}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, min_time: float) -> dict[str, tuple[float, float]]:
    """``{name: (min, median)}`` in ms over every round's samples; every round times every candidate once
    (``lowformer.bench.timing.interleave``, one thread)."""
    measured = interleave(fns, threads=1, rounds=rounds, warmup=2, min_run_time=min_time)
    return {name: (t["min_ms"], t["median_ms"]) for name, t in ((k, summarize(m)) for k, m in measured.items())}


class PointwiseBlock(nn.Module):
    """x + conv1x1(act(conv_kxk(x))): LowFormer's MLP (k=1, GELU), MBConv ends (k=1) and FusedMBConv (k=3)."""

    def __init__(self, channels: int, kernel: int, act: str) -> None:
        super().__init__()
        self.expand = nn.Conv2d(channels, 4 * channels, kernel, padding=kernel // 2)
        self.act = ACTIVATIONS[act][0]()
        self.project = nn.Conv2d(4 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.act(self.expand(x)))


def _matmul_chain(model: nn.Sequential, x: torch.Tensor, act: str, kind: str) -> Callable[[], torch.Tensor]:
    """The 1x1 chain as GEMMs on the NHWC view (``[H*W, C]``), pre-packed for that many rows."""
    rows = x.shape[0] * x.shape[2] * x.shape[3]
    x2d = x.permute(0, 2, 3, 1).reshape(rows, -1).contiguous()
    layers = []
    for block in model:
        pair = []
        for conv in (block.expand, block.project):
            w = conv.weight.detach().flatten(1).contiguous()
            packed = (torch.ops.mkldnn._reorder_linear_weight(w, rows) if kind == "onednn"
                      else torch.ops.mkl._mkl_reorder_linear_weight(w, rows))
            pair.append((w, packed, conv.bias.detach()))
        layers.append(pair)
    algorithm = "none" if act == "gelu" else ""

    def onednn() -> torch.Tensor:
        y = x2d
        for (_, p1, b1), (_, p2, b2) in layers:
            h = torch.ops.mkldnn._linear_pointwise(y, p1, b1, act, [], algorithm)
            y = torch.ops.mkldnn._linear_pointwise.binary(h, y, p2, b2, "add")
        return y

    def mkl() -> torch.Tensor:
        y = x2d
        for (w1, p1, b1), (w2, p2, b2) in layers:
            h = ACTIVATIONS[act][1](torch.ops.mkl._mkl_linear(y, p1, w1, b1, rows))
            y = torch.ops.mkl._mkl_linear(h, p2, w2, b2, rows).add_(y)
        return y

    return onednn if kind == "onednn" else mkl


def fp32_chains(rounds: int, min_time: float, workdir: Path, writer: csv.DictWriter, env: dict) -> None:
    # (channels, size, kernel, activation, blocks): stage 4 and stage 3 MLP / MBConv ends, stage 3 FusedMBConv
    for channels, size, kernel, act, blocks in [(256, 7, 1, "hardswish", 20), (128, 14, 1, "gelu", 10),
                                                (128, 14, 3, "hardswish", 5)]:
        torch.manual_seed(0)
        model = nn.Sequential(*[PointwiseBlock(channels, kernel, act) for _ in range(blocks)]).eval()
        x = torch.randn(1, channels, size, size)
        path = workdir / "chain.onnx"
        export_onnx(model, path, x)
        ort = OrtModule(path, 1)
        deployed = deploy(model, x)
        fns = {"onnxruntime": lambda: ort(x), "deploy (oneDNN conv)": lambda: deployed(x)}
        if kernel == 1:
            for kind, label in (("onednn", "oneDNN matmul"), ("mkl", "MKL packed sgemm")):
                fn = _matmul_chain(model, x, act, kind)
                with torch.inference_mode():
                    ref = model(x).permute(0, 2, 3, 1).reshape(size * size, channels)
                    assert torch.allclose(fn(), ref, atol=1e-3, rtol=1e-3), label
                fns[label] = fn
        with torch.inference_mode():
            result = interleaved(fns, rounds, min_time)
        macs = sum(m.weight.numel() * size * size for m in model.modules() if isinstance(m, nn.Conv2d))
        weights_mb = sum(p.numel() for p in model.parameters()) * 4 / 2 ** 20
        what = f"{blocks} x [{channels}->{4 * channels} {kernel}x{kernel}, {act}, ->{channels} 1x1, +x] at {size}x{size}"
        for name, (best, median) in result.items():
            writer.writerow({"section": "fp32", "case": what, "candidate": name, "min_ms": f"{best:.3f}",
                             "median_ms": f"{median:.3f}", "gflops": f"{2 * macs / best / 1e6:.1f}",
                             "vs_first": f"{result['onnxruntime'][0] / best:.2f}", "weights_mb": f"{weights_mb:.1f}",
                             **env})
            _logger.info("fp32 %-60s %-22s min %7.2f ms  median %7.2f  %5.1f GFLOP/s  %.2fx ORT", what, name, best,
                         median, 2 * macs / best / 1e6, result["onnxruntime"][0] / best)


class Parallel(nn.Module):
    """``copies`` convolutions of one input, summed: one convolution class whose weights do not stay in cache."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int, copies: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups)
                                   for _ in range(copies))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(c(x) for c in self.convs)


def int8_convs(rounds: int, min_time: float, workdir: Path, writer: csv.DictWriter, env: dict) -> None:
    for cin, cout, size, kernel, groups, copies in [(128, 512, 14, 3, 1, 4), (256, 1024, 7, 1, 1, 8),
                                                    (1024, 256, 7, 1, 1, 8), (128, 512, 14, 1, 1, 4),
                                                    (1024, 1024, 7, 3, 1024, 8)]:
        torch.manual_seed(0)
        model = Parallel(cin, cout, kernel, groups, copies).eval()
        x = torch.randn(1, cin, size, size)
        fp32, int8 = workdir / "conv.onnx", workdir / "conv_int8.onnx"
        export_onnx(model, fp32, x)
        quantize_int8(fp32, int8, torch.randn(8, cin, size, size))
        a, b = OrtModule(fp32, 1), OrtModule(int8, 1)
        result = interleaved({"onnxruntime fp32": lambda: a(x), "onnxruntime int8": lambda: b(x)}, rounds, min_time)
        what = (f"{copies} x {'depthwise ' if groups > 1 else ''}{kernel}x{kernel} {cin}->{cout} at {size}x{size}")
        for name, (best, median) in result.items():
            writer.writerow({"section": "int8", "case": what, "candidate": name, "min_ms": f"{best:.3f}",
                             "median_ms": f"{median:.3f}", "vs_first": f"{result['onnxruntime fp32'][0] / best:.2f}",
                             **env})
        _logger.info("int8 %-45s fp32 %.2f ms  int8 %.2f ms  speed-up %.2fx", what, result["onnxruntime fp32"][0],
                     result["onnxruntime int8"][0], result["onnxruntime fp32"][0] / result["onnxruntime int8"][0])


def overhead(rounds: int, min_time: float, writer: csv.DictWriter, env: dict) -> None:
    x = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    w, bias = torch.randn(16, 16, 1, 1), torch.randn(16)
    packed = torch.ops.mkldnn._reorder_convolution_weight(w, [0, 0], [1, 1], [1, 1], 1, list(x.shape))
    x2d, wt = x.permute(0, 2, 3, 1).reshape(16, 16), w.flatten(1).t().contiguous()
    fns = {
        "mkldnn._convolution_pointwise (deploy)": lambda: torch.ops.mkldnn._convolution_pointwise(
            x, packed, bias, [0, 0], [1, 1], [1, 1], 1, "none", [], ""),
        "F.conv2d": lambda: F.conv2d(x, w, bias),
        "torch.addmm on the NHWC view": lambda: torch.addmm(bias, x2d, wt),
    }
    with torch.inference_mode():
        result = interleaved(fns, rounds, min_time)
    for name, (best, median) in result.items():
        writer.writerow({"section": "overhead", "case": "1x1 conv 16->16 at 4x4, batch 1", "candidate": name,
                         "min_ms": f"{best:.4f}", "median_ms": f"{median:.4f}", **env})
        _logger.info("overhead %-40s min %.1f us  median %.1f us", name, best * 1e3, median * 1e3)


def _conv_class(x: list[int], w: list[int]) -> str:
    """Kernel class of a convolution from its input and weight shapes (``[O, I / groups, kh, kw]``)."""
    if len(w) != 4 or len(x) != 4:
        return "conv (other)"
    groups = x[1] // max(w[1], 1)
    if groups > 1 and groups == x[1]:
        return f"depthwise {w[2]}x{w[3]}"
    return f"conv {w[2]}x{w[3]}" + (" grouped" if groups > 1 else "")


_TORCH_CLASSES = {"aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
                  "aten::scaled_dot_product_attention": "attention", "aten::mm": "head (linear)",
                  "aten::addmm": "head (linear)", "aten::linear": "head (linear)"}
_ORT_CLASSES = {"Softmax": "attention", "Gemm": "head (linear)"}


def _torch_kernel_classes(module: nn.Module, x: torch.Tensor, runs: int) -> dict[str, float]:
    """ms per call by kernel class of ``module`` (self CPU time under ``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(runs):
                module(x)
    out: collections.Counter = collections.Counter()
    for e in prof.key_averages(group_by_input_shape=True):
        shapes = e.input_shapes
        if e.key in ("mkldnn::_linear_pointwise", "mkldnn::_linear_pointwise.binary"):
            # a 1x1 convolution as a matmul has a row per pixel; the head's linears one per image
            kind = "head (linear)" if shapes and shapes[0] and shapes[0][0] == x.shape[0] else "conv 1x1"
        elif e.key == "mkldnn::_convolution_pointwise":
            # the binary (fused residual) overload takes the residual second, the weight third
            kind = _conv_class(shapes[0], shapes[2] if len(shapes) >= 12 else shapes[1])
        elif e.key == "mkldnn::_convolution_transpose_pointwise":
            kind = "transposed conv"
        else:
            kind = _TORCH_CLASSES.get(e.key, "other")
        out[kind] += e.self_cpu_time_total / 1e3 / runs
    return dict(out)


def _ort_kernel_classes(path: Path, x: torch.Tensor, runs: int) -> dict[str, float]:
    """ms per call by kernel class of the ONNX file at ``path`` (ONNX Runtime's node profile, one thread)."""
    session = ort_session(path, 1, profile_prefix=str(path.with_suffix("")))
    feed = {session.get_inputs()[0].name: x.numpy()}
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    out: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op, shapes = e["args"]["op_name"], [next(iter(s.values())) for s in e["args"].get("input_type_shape", [])]
        if op in ("Conv", "FusedConv", "NchwcConv") and len(shapes) > 1:
            kind = _conv_class(shapes[0], shapes[1])
        elif op == "ConvTranspose":
            kind = "transposed conv"
        elif op == "MatMul":
            # a linear layer exports as MatMul with a 2-D weight; attention's products are batched 4-D
            kind = "head (linear)" if len(shapes) > 1 and len(shapes[1]) == 2 else "attention"
        else:
            kind = _ORT_CLASSES.get(op, "other")
        out[kind] += e["dur"] / 1e3 / runs
    return dict(out)


def model_kernels(models: list[str], rounds: int, min_time: float, runs: int, workdir: Path,
                  writer: csv.DictWriter, env: dict) -> None:
    for name in models:
        torch.manual_seed(0)
        model = create_model(name).eval()
        x = torch.randn(1, 3, 224, 224)
        path = workdir / f"{name}.onnx"
        export_onnx(model, path, x)
        # "deploy" runs this CPU's default passes; "deploy (no pointwise_matmul)" keeps the 1x1 convolutions as
        # oneDNN convolutions, which shows what the matmul pass gives on this CPU
        ort, deployed = OrtModule(path, 1), deploy(model, x)
        as_conv = deploy(model, x, passes=[n for n in default_passes() if n != "pointwise_matmul"])
        candidates = {"onnxruntime": lambda: ort(x), "deploy": lambda: deployed(x),
                      "deploy (no pointwise_matmul)": lambda: as_conv(x)}
        with torch.inference_mode():
            whole = interleaved(candidates, rounds, min_time)
        classes = {"onnxruntime": _ort_kernel_classes(path, x, runs),
                   "deploy": _torch_kernel_classes(deployed, x, runs),
                   "deploy (no pointwise_matmul)": _torch_kernel_classes(as_conv, x, runs)}
        rows = [("whole model (not profiled)", {k: v[0] for k, v in whole.items()})]
        rows += [(f"{kind} (profiled)", {k: classes[k].get(kind, 0.0) for k in classes})
                 for kind in sorted({k for c in classes.values() for k in c})]
        rows.append(("sum of kernels (profiled)", {k: sum(c.values()) for k, c in classes.items()}))
        for what, times in rows:
            for candidate, ms in times.items():
                ratio = times["onnxruntime"] / ms if ms > 0 else float("nan")
                writer.writerow({"section": "model", "case": f"{name}: {what}", "candidate": candidate,
                                 "min_ms": f"{ms:.3f}", "median_ms": f"{whole[candidate][1]:.3f}" if what.startswith(
                                     "whole") else "", "vs_first": f"{ratio:.2f}", **env})
            _logger.info("model %-14s %-34s ORT %7.2f ms  deploy %7.2f ms  without pointwise_matmul %7.2f ms", name,
                         what, times["onnxruntime"], times["deploy"], times["deploy (no pointwise_matmul)"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["fp32", "int8", "overhead", "model"], nargs="+",
                   default=["fp32", "int8", "overhead", "model"])
    p.add_argument("--models", nargs="+", default=["lowformer_b0", "lowformer_b1"], help="for the model section")
    p.add_argument("--profile-runs", type=int, default=20, help="model section: profiled calls per runtime")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per candidate per round")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    import onnxruntime
    env = environment("cpu", 1)
    row_env = {"device": env["device"], "cpu_flags": env["cpu_flags"], "vnni": cpu_has_vnni(), "torch": env["torch_version"],
               "onnxruntime": onnxruntime.__version__, "threads": 1, "load_avg_1m": f"{os.getloadavg()[0]:.2f}"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"deploy_kernels_cpu_{time.strftime('%Y%m%d-%H%M', time.gmtime())}.csv"
    fields = ["section", "case", "candidate", "min_ms", "median_ms", "gflops", "vs_first", "weights_mb", *row_env]
    with atomic_output(out) as partial, partial.open("w", newline="") as f, \
            tempfile.TemporaryDirectory(prefix="deploy-kernels-") as tmp:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        if "fp32" in args.only:
            fp32_chains(args.rounds, args.min_time, Path(tmp), writer, row_env)
        if "int8" in args.only:
            int8_convs(args.rounds, args.min_time, Path(tmp), writer, row_env)
        if "overhead" in args.only:
            overhead(args.rounds, args.min_time, writer, row_env)
        if "model" in args.only:
            model_kernels(args.models, args.rounds, args.min_time, args.profile_runs, Path(tmp), writer, row_env)
    _logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
