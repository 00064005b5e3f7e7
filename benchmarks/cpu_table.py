"""The CPU speed table: LowFormer B0/B1/B1.5/B3/E1 and the featured comparison backbones on this machine.

Batch 1 (latency) and batch 16 (throughput), one and two threads, eager PyTorch and the other backends given
(default: TorchScript with optimize_for_inference, and onnxruntime). All configurations of one batch size
are measured in interleaved rounds in one process, so load changes spread over every model; each record
gives the median and the minimum over its samples and the load average when its first round started.

    python benchmarks/cpu_table.py                       # full table -> benchmarks/results/cpu_table.{csv,png}
    python benchmarks/cpu_table.py --quick --tag quick   # batch 1 only, fewer passes
"""
from __future__ import annotations

import os

# Before torch starts its OpenMP pool: idle threads sleep instead of spinning, which on a machine shared with
# other processes avoids the 10-100x slow-downs of spinning threads waiting for a descheduled sibling.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowformer.bench.featured import FEATURED_EXAMPLES  # noqa: E402
from lowformer.bench.results import format_table, plot_records, write_records  # noqa: E402
from lowformer.bench.runner import BenchConfig, run_benchmark  # noqa: E402

LOWFORMER = ["lowformer_b0", "lowformer_b1", "lowformer_b15", "lowformer_b3", "lowformer_e1"]
RESULTS = Path(__file__).resolve().parent / "results"


def markdown_table(records: list[dict]) -> str:
    """One row per model: median (min) ms per batch for every (batch, threads, backend) column."""
    columns = sorted({(r["batch_size"], r["threads"], r["backend"]) for r in records},
                     key=lambda c: (c[0], c[1], c[2] != "eager", c[2]))
    cells = {(r["model"], r["batch_size"], r["threads"], r["backend"]): r for r in records}
    header = "| model | params (M) | MACs (M) | " + " | ".join(f"b{b} t{t} {k}" for b, t, k in columns) + " |"
    lines = [header, "| --- | ---: | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for model in dict.fromkeys(r["model"] for r in records):
        first = next(r for r in records if r["model"] == model)
        row = [f"{cells[(model, *c)]['median_ms']:.1f} ({cells[(model, *c)]['min_ms']:.1f})"
               if (model, *c) in cells else "-" for c in columns]
        lines.append(f"| {model} | {first['params'] / 1e6:.2f} | {first['macs'] / 1e6:.1f} | " + " | ".join(row) + " |")
    loads = [r["load_avg_1m"] for r in records]
    lines.append(f"\nms per batch, median (min); {records[0]['device']}, torch {records[0]['torch_version']}, "
                 f"OMP_WAIT_POLICY={records[0]['omp_wait_policy'] or 'unset'}, load average "
                 f"{min(loads):.1f}-{max(loads):.1f} when the configurations started.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="default: LowFormer B0/B1/B1.5/B3/E1 + featured")
    parser.add_argument("--backends", nargs="+", default=["eager", "onnxruntime"],
                        help="onnxruntime was the fastest of torchscript/onnxruntime for every model in the smoke run")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds at batch 1")
    parser.add_argument("--large-batch-rounds", type=int, default=1, help="interleaved rounds at larger batches")
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 1 round: a smoke run")
    parser.add_argument("--tag", default="cpu_table", help="file name stem under benchmarks/results/")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    models = args.models or LOWFORMER + list(FEATURED_EXAMPLES)
    batch_sizes = [1] if args.quick else args.batch_sizes
    print(f"models: {' '.join(models)}", flush=True)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    records, started = [], time.time()
    for batch in batch_sizes:
        # Batch 1: 3 warm-up passes, 10 timed per round; batch 16: 1 warm-up and 2 timed (a pass is seconds here).
        warmup, iterations = (3, 10) if batch == 1 else (1, 2)
        rounds = 1 if args.quick else args.rounds if batch == 1 else args.large_batch_rounds
        config = BenchConfig(models, mode="latency" if batch == 1 else "throughput", batch_size=batch,
                             threads=args.threads, backends=args.backends, iterations=iterations, warmup=warmup,
                             rounds=rounds, skip_failures=True)
        records += run_benchmark(config)
        print(f"batch {batch} done after {time.time() - started:.0f} s, load {os.getloadavg()}", flush=True)
    print(format_table(records))
    RESULTS.mkdir(exist_ok=True)
    write_records(RESULTS / f"{args.tag}.csv", records)
    write_records(RESULTS / f"{args.tag}.json", records)
    plot_records(records, RESULTS / f"{args.tag}.png",
                 title=f"{records[0]['device']} ({records[0]['cpu_flags']}), torch {records[0]['torch_version']}, "
                       f"shared VM (load {records[0]['load_avg_1m']:.1f})")
    (RESULTS / f"{args.tag}.md").write_text(markdown_table(records))
    print(f"wrote {RESULTS}/{args.tag}.{{csv,json,png,md}} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
