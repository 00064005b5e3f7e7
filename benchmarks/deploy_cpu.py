"""CPU speed of the deploy paths against their anchors (ONNX Runtime and OpenVINO), interleaved in one process.

For each model, batch size and thread count, every backend of the one backend table
(``lowformer.deploy.backends``) is prepared (its outputs checked against the eager model) and warmed up, then
timed in rounds through ``lowformer.bench.timing``: each round times every backend once, so a change in machine
load hits all backends alike. One CSV row per (model, batch, threads, backend) is appended as soon as its
configuration finishes, with the CPU's instruction-set flags, versions and the load, to a temporary file beside the
output that replaces it when the run completes (an existing file is kept if the run fails).

    python benchmarks/deploy_cpu.py             # full: B0 B1 B1.5 B3 E1 EdgeFormer-S, batch 1 and 16, 1 and 2 threads
    python benchmarks/deploy_cpu.py --quick              # B0 and B1, batch 1, one thread
    python benchmarks/deploy_cpu.py --accuracy           # int8 / bf16 cosine to fp32 on the imagenet-sample images

Backends: ``eager`` (timm), ``onnxruntime`` and ``openvino`` / ``openvino-bf16`` / ``openvino-int8`` (the plain
export: the anchors), ``deploy``, ``deploy-bf16``, ``onnxruntime-deploy``, ``onnxruntime-int8`` and
``openvino-deploy`` / ``openvino-deploy-bf16`` / ``openvino-deploy-int8`` (our deploy export). int8 paths are
calibrated on 16 imagenet-sample images.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lowformer  # noqa: E402
from lowformer.bench.complexity import count_macs  # noqa: E402
from lowformer.bench.timing import environment, measure  # noqa: E402
from lowformer.data import eval_transform, load_image  # noqa: E402
from lowformer.deploy.backends import prepare  # noqa: E402
from lowformer.deploy.cpu import cpu_features  # noqa: E402
from lowformer.files import atomic_output  # noqa: E402

_logger = logging.getLogger("deploy_cpu")
RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["lowformer_b0", "lowformer_b1", "lowformer_b15", "lowformer_b3", "lowformer_e1", "edgeformer_s"]
BACKENDS = ["eager", "onnxruntime", "openvino", "openvino-bf16", "openvino-int8", "deploy", "deploy-bf16",
            "onnxruntime-deploy", "onnxruntime-int8", "openvino-deploy", "openvino-deploy-bf16", "openvino-deploy-int8"]
IMAGES = Path(os.environ.get(
    "LOWFORMER_IMAGENET_SAMPLE", Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample")) / "val"


def real_images(model: torch.nn.Module, count: int) -> torch.Tensor:
    files = sorted(p for p in IMAGES.rglob("*") if p.is_file() and p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    transform = eval_transform(model)
    return torch.stack([transform(load_image(f)) for f in files[:count]])


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
            prepared = prepare(model, backend, x, threads=threads, cache_key=name, cache_dir=workdir,
                               calibration=calibration)
            runners[backend] = prepared.run
            info = prepared.info
            cos = info.get("openvino_cosine", info.get("int8_cosine", prepared.check["min_cosine"]))
            notes[backend] = f"rel_diff={prepared.check['rel_diff']:.2g} cosine={cos:.5f}"
        except Exception as e:  # noqa: BLE001 - a failing backend is recorded, not fatal to the run
            _logger.warning("%s %s failed: %s", name, backend, e)
            notes[backend] = f"failed: {type(e).__name__}: {e}".splitlines()[0][:200]
        _logger.info("%s batch %d threads %d: %s prepared in %.1fs", name, batch, threads, backend,
                     time.perf_counter() - t0)
    times: dict[str, list[float]] = {b: [] for b in runners}
    loads: list[float] = []
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        for backend, run in runners.items():
            m = measure(run, threads=threads, warmup=2, min_run_time=min_run_time, min_samples=3)
            times[backend].append(m.median)
    env = environment("cpu", threads)
    feats = cpu_features()
    for backend in backends:
        t = sorted(times.get(backend, []))
        row = {
            "model": name, "backend": backend, "batch": batch, "threads": threads,
            "median_ms": round(t[len(t) // 2] * 1e3, 3) if t else "", "min_ms": round(t[0] * 1e3, 3) if t else "",
            "images_per_s": round(batch / t[len(t) // 2], 1) if t else "",
            "gflops": round(2 * macs / t[len(t) // 2] / 1e9, 1) if t else "",
            "rounds": len(t), "macs_per_image_m": round(macs / batch / 1e6, 1),
            "load_min": round(min(loads), 2), "load_max": round(max(loads), 2),
            "device": env["device"], "cpu_class": feats.isa_class, "cpu_flags": env["cpu_flags"],
            "cpu_count": env["cpu_count"], "torch": env["torch_version"], "openvino": _version("openvino"),
            "onnxruntime": _version("onnxruntime"), "note": notes.get(backend, ""),
        }
        writer.writerow(row)
        _logger.info("%-14s %-22s b%-3d t%d %9s ms  load %.1f-%.1f  %s", name, backend, batch, threads,
                     row["median_ms"], min(loads), max(loads), row["note"][:60])


def _version(package: str) -> str:
    try:
        return __import__(package).__version__
    except ImportError:
        return ""


def accuracy(models: list[str], count: int, out: Path) -> None:
    """Cosine of int8 / bf16 outputs to the fp32 eager model on real images with random weights: numerical
    agreement, not task accuracy (for a trained checkpoint see deploy_accuracy_cifar10.py). int8 is calibrated on
    the first 32 images and scored on the others: ONNX Runtime with the default weights (7-bit on a CPU without VNNI)
    and with full 8-bit weights, and OpenVINO bf16 / NNCF int8 on the deploy export."""
    from lowformer.deploy import deploy
    from lowformer.deploy.onnx import deploy_int8
    from lowformer.deploy.openvino import deploy_openvino
    env = environment("cpu", 1)
    with atomic_output(out) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "precision", "images", "mean_cosine", "min_cosine", "top1_agreement", "weights",
                         "device", "cpu_class", "torch"])
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
                "openvino bf16": deploy_openvino(model, images[:1], "bf16", min_cosine=-1.0),
                "openvino int8 (NNCF)": deploy_openvino(model, images[:1], "int8", calibration, min_cosine=-1.0),
            }
            for precision, deployed in paths.items():
                with torch.inference_mode():
                    out_ = torch.cat([deployed(b) for b in held_out.split(16)])
                cos = torch.nn.functional.cosine_similarity(out_, ref, dim=1)
                agree = (out_.argmax(1) == ref.argmax(1)).float().mean().item()
                writer.writerow([name, precision, len(held_out), f"{cos.mean():.5f}", f"{cos.min():.5f}",
                                 f"{agree:.3f}", "random init (seed 0)", env["device"], cpu_features().isa_class,
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
    native_bf16 = cpu_features().bf16
    out = args.out or RESULTS / f"deploy_cpu_{'quick_' if args.quick else ''}{stamp}.csv"
    fields = ["model", "backend", "batch", "threads", "median_ms", "min_ms", "images_per_s", "gflops", "rounds",
              "macs_per_image_m", "load_min", "load_max", "device", "cpu_class", "cpu_flags", "cpu_count", "torch",
              "openvino", "onnxruntime", "note"]
    with atomic_output(out) as partial, partial.open("w", newline="") as f, \
            tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for threads in threads_list:  # the headline setting (one thread, batch 1) first, for every model
            for batch in batches:
                for name in models:
                    backends = [b for b in args.backends if "bf16" not in b or batch == 1 or native_bf16]
                    bench_config(name, batch, threads, backends, rounds, args.min_run_time, Path(tmp), writer)
                    f.flush()
    _logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
