"""``lowformer bench MODEL [MODEL...]``: throughput or latency of models on this machine, per backend.

The original ``eval_cls_model.py`` spellings are accepted where they map naturally: ``--batch_size``,
``--image_size``, ``--iterations``, ``--optit`` (= ``--backend torchscript``), ``--onnxrun``
(= ``--backend onnxruntime``), ``--jobs``, ``--latency`` (= ``--mode latency``) and ``--other NAME``."""
from __future__ import annotations

import argparse

import torch

from lowformer.bench.backends import AMP_DTYPES, BACKENDS
from lowformer.bench.results import format_table, plot_records, write_records
from lowformer.bench.runner import BenchConfig, run_jobs
from lowformer.errors import LowformerError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="time models: throughput or latency, several backends, sizes and thread counts",
        description="Time forward passes of models (project, timm or the original's --other names) with "
                    "warm-up excluded, median/min/IQR over samples, and params and MACs beside each figure.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="model names, e.g. lowformer_b1 fastvit_t8 mobileones1")
    p.add_argument("--other", action="append", default=[], metavar="NAME",
                   help="another backbone by the original's short name (repeatable; same as a MODEL)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--mode", choices=["throughput", "latency"], default="throughput",
                   help="throughput: a large batch (200 on GPU, 16 on CPU); latency: batch 1")
    p.add_argument("--latency", dest="mode", action="store_const", const="latency", help="same as --mode latency")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                   help="override the mode's batch size")
    p.add_argument("--image-size", "--image_size", dest="image_sizes", type=int, nargs="+", default=[224],
                   metavar="SIZE", help="square input side; several values sweep the resolution")
    p.add_argument("--iterations", type=int, default=None,
                   help="time exactly this many passes one by one (default: repeat blocks for --min-time s)")
    p.add_argument("--min-time", dest="min_run_time", type=float, default=1.0,
                   help="seconds of timing per configuration and round when --iterations is not given")
    p.add_argument("--warmup", type=int, default=10, help="untimed passes before each measurement")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every configuration this many times, interleaved, and merge the samples")
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                   help="CPU threads (intra-op); several values sweep")
    p.add_argument("--backend", dest="backends", nargs="+", choices=BACKENDS, default=None,
                   help="one or several of: " + ", ".join(BACKENDS) + " (default eager)")
    p.add_argument("--optit", dest="extra_backends", action="append_const", const="torchscript",
                   help="same as --backend torchscript (trace, freeze, optimize_for_inference)")
    p.add_argument("--onnxrun", dest="extra_backends", action="append_const", const="onnxruntime",
                   help="same as --backend onnxruntime")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset for the onnxruntime backend")
    p.add_argument("--amp", choices=list(AMP_DTYPES), default=None, help="autocast dtype for PyTorch backends")
    p.add_argument("--no-deploy", dest="deploy", action="store_false",
                   help="time the training form instead of timm's reparameterize_model deploy form")
    p.add_argument("--jobs", type=int, default=1,
                   help="N processes benchmarking at once (per-process and aggregate figures); implies latency")
    p.add_argument("--out", action="append", default=[], metavar="FILE",
                   help="write the records to FILE.json or FILE.csv (repeatable)")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="latency vs resolution per model (with a size sweep), else throughput vs MACs")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    models = list(args.models) + list(args.other)
    if not models:
        raise LowformerError("no model given: name one or more, e.g. `lowformer bench lowformer_b1 fastvit_t8`")
    backends = list(dict.fromkeys((args.backends or ([] if args.extra_backends else ["eager"]))
                                  + (args.extra_backends or [])))
    mode = "latency" if args.jobs > 1 else args.mode
    return BenchConfig(
        models=models, device=args.device, mode=mode, batch_size=args.batch_size, image_sizes=args.image_sizes,
        threads=args.threads, backends=backends, iterations=args.iterations, warmup=args.warmup,
        min_run_time=args.min_run_time, rounds=args.rounds, amp=args.amp, opset=args.opset, deploy=args.deploy,
        jobs=args.jobs)


def run(args: argparse.Namespace) -> int:
    records = run_jobs(config_from_args(args))
    print(format_table(records))
    for path in args.out:
        write_records(path, records)
    if args.plot:
        plot_records(records, args.plot)
    return 0
