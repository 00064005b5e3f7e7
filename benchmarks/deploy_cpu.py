"""CPU speed of the deploy path against its anchors, interleaved in one process.

For each model, batch size and thread count, every backend is prepared (and its outputs checked against the
eager model) and warmed up, then timed in rounds: each round times every backend once (median of its calls
over ``--min-run-time``), so a change in machine load hits all backends alike. A fp32 matmul is timed in the
same rounds as the peak the achieved GFLOP/s is compared with. One CSV row per (model, batch, threads,
backend) is appended as soon as its configuration finishes, with device, torch version and load.

    python benchmarks/deploy_cpu.py                      # full: B0 B1 B1.5 B3 E1, batch 1 and 16, 1 and 2 threads
    python benchmarks/deploy_cpu.py --quick              # B0 and B1, batch 1, one thread
    python benchmarks/deploy_cpu.py --accuracy           # int8 / bf16 cosine to fp32 on the imagenet-sample images

Backends: ``eager`` (timm), ``torchscript`` (trace + freeze + optimize_for_inference), ``onnxruntime`` (plain
export), ``deploy``, ``onnxruntime-deploy``, ``deploy-bf16``, ``onnxruntime-int8`` (calibrated on real images).
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lowformer  # noqa: E402
from lowformer.bench.complexity import count_macs  # noqa: E402
from lowformer.bench.timing import environment  # noqa: E402
from lowformer.data import eval_transform, load_image  # noqa: E402
from lowformer.deploy.backends import deploy_runner  # noqa: E402
from lowformer.deploy.check import compare_outputs  # noqa: E402
from lowformer.deploy.onnx import OrtModule, export_onnx  # noqa: E402

_logger = logging.getLogger("deploy_cpu")
RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["lowformer_b0", "lowformer_b1", "lowformer_b15", "lowformer_b3", "lowformer_e1"]
BACKENDS = ["eager", "torchscript", "onnxruntime", "deploy", "onnxruntime-deploy", "deploy-bf16", "onnxruntime-int8"]
_ONNX_FILES: dict[str, dict[str, str]] = {}
IMAGES = Path(os.environ.get(
    "LOWFORMER_IMAGENET_SAMPLE", Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample")) / "val"


def real_images(model: torch.nn.Module, count: int) -> torch.Tensor:
    files = sorted(p for p in IMAGES.rglob("*") if p.is_file() and p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    transform = eval_transform(model)
    return torch.stack([transform(load_image(f)) for f in files[:count]])


def torchscript_runner(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x[:1], check_trace=False)))

    def run() -> Any:
        with torch.inference_mode():
            return ts(x)
    return run


def prepare(name: str, model: torch.nn.Module, backend: str, x: torch.Tensor, threads: int,
            calibration: torch.Tensor, workdir: Path) -> tuple[Callable[[], Any], str]:
    """A zero-argument callable for ``backend`` on ``x`` and a note (output check, passes)."""
    if backend == "eager":
        def run() -> Any:
            with torch.inference_mode():
                return model(x)
        return run, ""
    if backend == "torchscript":
        run = torchscript_runner(model, x)
    elif backend == "onnxruntime":
        path = workdir / f"{name}_plain.onnx"
        if not path.exists():
            export_onnx(model, path, x[:1])
        session = OrtModule(path, threads)

        def run() -> Any:
            return session(x)
    elif backend in _ONNX_FILES.get(name, {}):  # exported with a dynamic batch: one file per model
        session = OrtModule(_ONNX_FILES[name][backend], threads)

        def run() -> Any:
            return session(x)
    else:
        run, info = deploy_runner(model, backend, x, threads=threads, calibration=calibration,
                                  workdir=workdir / f"{name}_{backend}")
        if "onnx_file" in info:
            _ONNX_FILES.setdefault(name, {})[backend] = info["onnx_file"]
        return run, "+".join(info["passes"]) if "passes" in info else f"cosine={info['check']['min_cosine']:.4f}"
    check = compare_outputs(lambda _: model(x), lambda _: run(), [x])
    return run, f"rel_diff={check['rel_diff']:.2g}"


def matmul_peak_runner(threads: int) -> tuple[Callable[[], Any], float]:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return (lambda: torch.mm(a, b)), 2 * 1024 ** 3


def time_once(fn: Callable[[], Any], min_run_time: float) -> tuple[float, float]:
    """(median wall seconds per call, this process's CPU seconds per call) over at least ``min_run_time``
    and 3 calls. On a loaded shared machine CPU time is the steadier figure (it excludes time spent
    preempted); for one thread on an idle machine the two agree."""
    walls, cpu0, start = [], time.process_time(), time.perf_counter()
    while len(walls) < 3 or time.perf_counter() - start < min_run_time:
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return sorted(walls)[len(walls) // 2], (time.process_time() - cpu0) / len(walls)


def bench_config(name: str, batch: int, threads: int, backends: list[str], rounds: int, min_run_time: float,
                 workdir: Path, writer: csv.DictWriter) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = lowformer.create_model(name).eval()
    size = model.pretrained_cfg["input_size"]
    x = torch.randn(batch, *size)
    calibration = real_images(model, 16)
    macs = count_macs(model, size, batch_size=batch)
    runners, notes = {}, {}
    for backend in backends:
        t0 = time.perf_counter()
        try:
            runners[backend], notes[backend] = prepare(name, model, backend, x, threads, calibration, workdir)
        except Exception as e:  # noqa: BLE001 - a failing backend is recorded, not fatal to the run
            _logger.warning("%s %s failed: %s", name, backend, e)
            notes[backend] = f"failed: {type(e).__name__}: {e}".splitlines()[0][:200]
        _logger.info("%s batch %d threads %d: %s prepared in %.1fs", name, batch, threads, backend,
                     time.perf_counter() - t0)
    peak_fn, peak_flop = matmul_peak_runner(threads)
    times: dict[str, list[float]] = {b: [] for b in runners}
    cpu_times: dict[str, list[float]] = {b: [] for b in runners}
    peaks: list[float] = []
    loads: list[float] = []
    for run in runners.values():
        run()
        run()
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        peaks.append(peak_flop / time_once(peak_fn, 0.1)[0] / 1e9)
        for backend, run in runners.items():
            wall, cpu = time_once(run, min_run_time)
            times[backend].append(wall)
            cpu_times[backend].append(cpu)
    env = environment("cpu", threads)
    peak = max(peaks)
    for backend in backends:
        t, c = sorted(times.get(backend, [])), sorted(cpu_times.get(backend, []))
        row = {
            "model": name, "backend": backend, "batch": batch, "threads": threads,
            "median_ms": round(t[len(t) // 2] * 1e3, 3) if t else "", "min_ms": round(t[0] * 1e3, 3) if t else "",
            "cpu_ms_per_thread": round(c[len(c) // 2] * 1e3 / threads, 3) if c else "",
            "images_per_s": round(batch / t[len(t) // 2], 1) if t else "",
            "gflops": round(2 * macs / t[len(t) // 2] / 1e9, 1) if t else "",
            "matmul_peak_gflops": round(peak, 1), "rounds": len(t), "macs_per_image_m": round(macs / batch / 1e6, 1),
            "load_min": round(min(loads), 2), "load_max": round(max(loads), 2),
            "device": env["device"], "cpu_count": env["cpu_count"], "torch": env["torch_version"],
            "note": notes.get(backend, ""),
        }
        writer.writerow(row)
        _logger.info("%-14s %-20s b%-3d t%d %9s ms (cpu %s)  %s GFLOP/s (peak %.0f)  load %.1f-%.1f  %s", name, backend, batch,
                     threads, row["median_ms"], row["cpu_ms_per_thread"], row["gflops"], peak, min(loads), max(loads),
                     row["note"][:60])


def accuracy(models: list[str], count: int, out: Path) -> None:
    """Cosine of int8 / bf16 outputs to the fp32 eager model on real images with random weights: numerical
    agreement, not task accuracy (for a trained checkpoint see deploy_accuracy_cifar10.py). int8 is calibrated on
    the first 32 images and scored on the others, with the default weights (7-bit on a CPU without VNNI) and with
    full 8-bit weights, to show the saturation the default avoids."""
    from lowformer.deploy import deploy
    from lowformer.deploy.onnx import cpu_has_vnni, deploy_int8
    env = environment("cpu", 1)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "precision", "images", "mean_cosine", "min_cosine", "top1_agreement", "weights",
                         "device", "vnni", "torch"])
        for name in models:
            torch.manual_seed(0)
            model = lowformer.create_model(name).eval()
            images = real_images(model, count)
            calibration, held_out = images[:32], images[32:]
            with torch.inference_mode():
                ref = torch.cat([model(b) for b in held_out.split(16)])
            paths = {
                "bf16": deploy(model, images[:1], precision="bf16", min_cosine=-1.0),
                "int8": deploy(model, images[:1], precision="int8", calibration=calibration, min_cosine=-1.0),
                "int8 (8-bit weights)": deploy_int8(model, images[:1], calibration, min_cosine=-1.0,
                                                    reduce_range=False),
            }
            for precision, deployed in paths.items():
                with torch.inference_mode():
                    out_ = torch.cat([deployed(b) for b in held_out.split(16)])
                cos = torch.nn.functional.cosine_similarity(out_, ref, dim=1)
                agree = (out_.argmax(1) == ref.argmax(1)).float().mean().item()
                writer.writerow([name, precision, len(held_out), f"{cos.mean():.5f}", f"{cos.min():.5f}",
                                 f"{agree:.3f}", "random init (seed 0)", env["device"], cpu_has_vnni(),
                                 env["torch_version"]])
                _logger.info("%s %s: cosine mean %.5f min %.5f, top-1 agreement %.3f", name, precision,
                             cos.mean(), cos.min(), agree)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B0 and B1, batch 1, one thread, 3 rounds")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--threads", nargs="+", type=int, default=None)
    p.add_argument("--backends", nargs="+", default=BACKENDS)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per backend per round")
    p.add_argument("--accuracy", action="store_true", help="low-precision cosine on real images instead of timing")
    p.add_argument("--images", type=int, default=250, help="--accuracy: how many imagenet-sample images")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    if args.accuracy:
        accuracy(args.models or ["lowformer_b0", "lowformer_b1"], args.images,
                 args.out or RESULTS / f"deploy_accuracy_{stamp}.csv")
        return 0
    models = args.models or (MODELS[:2] if args.quick else MODELS)
    batches = args.batches or ([1] if args.quick else [1, 16])
    threads_list = args.threads or ([1] if args.quick else [1, 2])
    rounds = args.rounds or (3 if args.quick else 5)
    # emulated bf16 is ~10x slower than fp32; timing it at batch 16 would take most of the run
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    out = args.out or RESULTS / f"deploy_cpu_{'quick_' if args.quick else ''}{stamp}.csv"
    fields = ["model", "backend", "batch", "threads", "median_ms", "min_ms", "cpu_ms_per_thread", "images_per_s", "gflops",
              "matmul_peak_gflops", "rounds", "macs_per_image_m", "load_min", "load_max", "device", "cpu_count",
              "torch", "note"]
    with out.open("w", newline="") as f, tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for threads in threads_list:  # the headline setting (one thread, batch 1) first, for every model
            for batch in batches:
                for name in models:
                    backends = [b for b in args.backends if b != "deploy-bf16" or batch == 1 or native_bf16]
                    bench_config(name, batch, threads, backends, rounds, args.min_run_time, Path(tmp), writer)
                    f.flush()
    _logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
