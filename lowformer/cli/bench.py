"""``lowformer bench MODEL [MODEL...]``: throughput or latency of models on this machine, per backend.

Flags are spelled with dashes; the underscore spellings, the original ``eval_cls_model.py``'s (``--testrun``,
``--cpu``, ``--gpu N``, ``--optit``, ``--onnxrun``, ``--latency``, ``--other NAME``) and timm's ``-b`` /
``--img-size`` are accepted as aliases."""
from __future__ import annotations

import argparse

import torch

from lowformer.bench.results import format_table
from lowformer.bench.runner import BenchConfig, benchmark
from lowformer.bench.timing import MIN_SAMPLES
from lowformer.deploy.backends import AMP_DTYPES, BACKENDS
from lowformer.deploy.onnx import OPSET


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="time models: throughput or latency, several backends, sizes and thread counts",
        description="Time forward passes of models (project, timm or the original's --other names) with "
                    "warm-up excluded, median/min/IQR over samples, and params and MACs beside each figure.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="model names, e.g. lowformer_b1 fastvit_t8 mobileones1, "
                   "or detectors / segmenters as ARCH:BACKBONE, e.g. retinanet:lowformer_b0 upernet:dwnet_tiny "
                   "(eval mode, a batch of --batch-size images)")
    p.add_argument("--other", action="append", default=[], metavar="NAME",
                   help="another backbone by the original's short name (repeatable; same as a MODEL)")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    device.add_argument("--cpu", dest="device", action="store_const", const="cpu",
                        help="the original's flag: same as --device cpu")
    device.add_argument("--gpu", dest="gpu", type=int, default=None, metavar="N",
                        help="the original's flag: same as --device cuda:N")
    p.add_argument("--mode", choices=["throughput", "latency"], default="throughput",
                   help="throughput: a large batch (200 on GPU, 16 on CPU); latency: batch 1")
    p.add_argument("--latency", dest="mode", action="store_const", const="latency", help="same as --mode latency")
    p.add_argument("--testrun", action="store_true",
                   help="the original's flag for benchmarking instead of evaluating: accepted; bench always "
                        "benchmarks (throughput unless --latency)")
    p.add_argument("--batch-size", "--batch_size", "-b", dest="batch_size", type=int, default=None,
                   help="override the mode's batch size")
    p.add_argument("--image-size", "--image_size", "--img-size", dest="image_sizes", type=int, nargs="+",
                   default=None, metavar="SIZE", help="square input side; several values sweep the resolution "
                   "(default: 224, and a detector's / segmenter's test size, e.g. 800x1333 for "
                   "retinanet:lowformer_b0, 320x320 for ssdlite:edgeformer_s, 512x512 for segmenters)")
    p.add_argument("--iterations", type=int, default=None,
                   help="time exactly this many passes one by one (default: repeat blocks for --min-time s)")
    p.add_argument("--min-time", "--min_time", dest="min_run_time", type=float, default=1.0,
                   help="seconds of timing per configuration and round when --iterations is not given")
    p.add_argument("--min-samples", "--min_samples", dest="min_samples", type=int, default=MIN_SAMPLES,
                   help="samples per configuration and round at least, when --iterations is not given "
                        "(default %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="untimed passes before each measurement")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every configuration this many times, interleaved, and merge the samples")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="CPU threads (intra-op); several values sweep (default: the machine's threads shared "
                        "out among --jobs)")
    p.add_argument("--backend", "--backends", dest="backends", nargs="+", choices=list(BACKENDS), default=None,
                   metavar="BACKEND", help="one or several of: " + ", ".join(BACKENDS) + " (default eager)")
    p.add_argument("--optit", dest="extra_backends", action="append_const", const="torchscript",
                   help="same as --backend torchscript (trace, freeze, optimize_for_inference)")
    p.add_argument("--onnxrun", dest="extra_backends", action="append_const", const="onnxruntime",
                   help="same as --backend onnxruntime")
    p.add_argument("--opset", type=int, default=OPSET, help="ONNX opset for the ONNX backends (default %(default)s)")
    p.add_argument("--amp", choices=list(AMP_DTYPES), default=None, help="autocast dtype for PyTorch backends")
    p.add_argument("--no-deploy", "--no_deploy", dest="deploy", action="store_false",
                   help="time the training form instead of the re-parameterised deploy form")
    p.add_argument("--jobs", type=int, default=1,
                   help="N processes benchmarking at once (per-process and aggregate figures); implies latency")
    p.add_argument("--onnx-cache", "--onnx_cache", dest="onnx_cache", default=None, metavar="DIR",
                   help="folder of exported ONNX files (default: $LOWFORMER_CACHE/onnx or ~/.cache/lowformer/onnx)")
    p.add_argument("--out", action="append", default=[], metavar="FILE",
                   help="write the records to FILE.json or FILE.csv (repeatable)")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="batch-1 latency and throughput bars per backend and thread count (IQR error bars, noisy "
                        "figures hatched); latency against resolution with a size sweep")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    backends = list(dict.fromkeys((args.backends or ([] if args.extra_backends else ["eager"]))
                                  + (args.extra_backends or [])))
    device = f"cuda:{args.gpu}" if args.gpu is not None else args.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return BenchConfig(
        models=list(args.models) + list(args.other), device=device, mode=args.mode, batch_size=args.batch_size,
        image_sizes=args.image_sizes, threads=args.threads, backends=backends, iterations=args.iterations,
        warmup=args.warmup, min_run_time=args.min_run_time, min_samples=args.min_samples, rounds=args.rounds,
        amp=args.amp, opset=args.opset, deploy=args.deploy, jobs=args.jobs, onnx_cache=args.onnx_cache)


def run(args: argparse.Namespace) -> int:
    print(format_table(benchmark(config_from_args(args), outputs=args.out, plot=args.plot)))
    return 0
