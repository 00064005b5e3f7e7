"""Writes RUN_DIR/benchmark.json for the composite CPU benchmarks: the scores, the wall and process CPU time of
each stage, and the machine (CPU name and speed flags, cores, threads, versions, load).

    python benchmarks/record_run.py RUN_DIR SCORES_JSON STAGE=WALL,USER,SYS ... [--set KEY=VALUE ...]

Stage times come from the calling shell (``times`` after each stage); the total is their sum. A resumed
benchmark counts only the stages' time in the invocation that finished it: quote uninterrupted runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from lowformer.bench.timing import environment


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("scores", type=Path)
    p.add_argument("stages", nargs="+", help="NAME=WALL,USER,SYS in seconds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra fields (recipe knobs)")
    args = p.parse_args(argv)
    scores = json.loads(args.scores.read_text())
    stages = {}
    for spec in args.stages:
        name, _, values = spec.partition("=")
        wall, user, system = (float(v) for v in values.split(","))
        stages[name] = {"wall_s": wall, "cpu_s": round(user + system, 1)}
    env = environment("cpu")
    out = {
        # folder names only: a committed result must not carry this machine's paths
        **{k: Path(v).name if k in ("run", "data") else v for k, v in scores.items() if not isinstance(v, (dict, list))},
        "per_class": next((scores[k] for k in ("per_class_iou", "bbox_per_class") if k in scores), None),
        "stages": stages,
        "wall_s": round(sum(s["wall_s"] for s in stages.values()), 1),
        "cpu_s": round(sum(s["cpu_s"] for s in stages.values()), 1),
        **dict(kv.split("=", 1) for kv in args.set),
        "cpu": env["device"], "cpu_flags": env["cpu_flags"], "cores": os.cpu_count(),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0), "load_avg_1m_at_end": env["load_avg_1m"],
        "python": platform.python_version(), "torch": env["torch_version"], "timm": env["timm_version"],
        "note": "wall includes waiting for the CPU on a shared machine; cpu_s is the processes' own user + sys time",
    }
    tmp = args.run_dir / ".benchmark.json.tmp"
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, args.run_dir / "benchmark.json")
    brief = {k: out[k] for k in ("miou", "bbox_map", "bbox_map_50", "segm_map", "wall_s", "cpu_s", "cpu") if k in out}
    print(json.dumps(brief))
    return 0


if __name__ == "__main__":
    sys.exit(main())
