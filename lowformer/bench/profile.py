"""Where a model's cost goes: MACs and time per stage, and the torch profiler's per-operator table.

Stages are the modules timm names in ``feature_info`` (``stages.0`` ...) plus the other top-level children
(stem, head parts), in the order the forward pass runs them. MACs per stage come from the same counter as
the totals; time per stage from forward hooks around each stage, read with a synchronising clock."""
from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn as nn
from torch.utils.benchmark.utils.common import set_torch_threads
from torch.utils.benchmark.utils.timer import timer as synchronised_clock
from torch.utils.flop_counter import FlopCounterMode

from lowformer.bench.complexity import _EXTRA_FORMULAS, count_params
from lowformer.bench.featured import build_model

__all__ = ["stage_names", "profile_model"]


def stage_names(model: nn.Module) -> list[str]:
    """``feature_info`` modules plus the top-level children that contain none of them."""
    featured = [info["module"] for info in getattr(model, "feature_info", []) if info.get("module")]
    modules = dict(model.named_modules())
    featured = [n for n in featured if n in modules]
    names = list(featured)
    for child, _ in model.named_children():
        if not any(f == child or f.startswith(child + ".") for f in featured):
            names.append(child)
    return names


def _execution_order(model: nn.Module, names: list[str], x: torch.Tensor) -> list[str]:
    order: list[str] = []
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order else None)
               for n in names]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in names if n not in order]


@torch.inference_mode()
def profile_model(name: str, image_size: int = 224, batch_size: int = 1, device: str = "cpu", threads: int = 1,
                  iterations: int = 20, warmup: int = 5, deploy: bool = True, row_limit: int = 15) -> dict[str, Any]:
    """Params, MACs, per-stage MACs and median ms, and the per-operator profiler table of ``name``; every
    argument is range-checked before the model is built."""
    from lowformer.bench.runner import require_at_least
    from lowformer.deploy.backends import parse_device
    from lowformer.models import resolve_model_name
    require_at_least(image_size, 1, "--image-size", "give a side of at least 1 pixel")
    require_at_least(batch_size, 1, "--batch-size", "give at least 1")
    require_at_least(threads, 1, "--threads", "give at least 1 thread")
    require_at_least(iterations, 1, "--iterations", "time at least 1 pass")
    require_at_least(warmup, 0, "--warmup", "give 0 or more untimed passes")
    require_at_least(row_limit, 1, "--rows", "show at least 1 row")
    device = parse_device(device)
    resolve_model_name(name)
    model = build_model(name, deploy=deploy).to(device)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    names = _execution_order(model, stage_names(model), x)
    modules = dict(model.named_modules())

    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with counter:
        model(x)
    flops = counter.get_flop_counts()
    root = type(model).__name__
    stage_macs = {n: sum(flops.get(f"{root}.{n}", {}).values()) // 2 for n in names}

    starts: dict[str, float] = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    handles = []
    for n in names:
        handles.append(modules[n].register_forward_pre_hook(
            lambda m, a, n=n: starts.__setitem__(n, synchronised_clock())))
        handles.append(modules[n].register_forward_hook(
            lambda m, a, o, n=n: times[n].append(synchronised_clock() - starts[n])))
    totals = []
    with set_torch_threads(threads):
        for _ in range(warmup):
            model(x)
        for t in times.values():
            t.clear()
        for _ in range(iterations):
            start = synchronised_clock()
            model(x)
            totals.append(synchronised_clock() - start)
        for h in handles:
            h.remove()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if x.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(min(iterations, 5)):
                model(x)
    sort_by = "self_cuda_time_total" if x.device.type == "cuda" else "self_cpu_time_total"
    total_macs = counter.get_total_flops() // 2
    return {
        "model": name, "image_size": image_size, "batch_size": batch_size, "threads": threads,
        "params": count_params(model), "macs": total_macs, "median_ms": statistics.median(totals) * 1e3,
        "stages": [{"stage": n, "macs": stage_macs[n], "median_ms": statistics.median(times[n]) * 1e3}
                   for n in names],
        "operator_table": prof.key_averages().table(sort_by=sort_by, row_limit=row_limit),
    }
