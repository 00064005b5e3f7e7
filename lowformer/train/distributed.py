"""One context object for the process group, built once at start-up, with a single-process fallback.

Launched by torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) it initialises the process group with
timm's helper: nccl on CUDA, gloo on the CPU; otherwise it is a world of one. Nothing below reads the
environment again: the context is passed down.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "all_reduce_sum", "rank_max_diff", "broadcast_object"]


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str | None = None) -> DistContext:
    """Join torchrun's process group if launched by it; the device defaults to CUDA when available."""
    from timm.utils.distributed import init_distributed_device_so
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = init_distributed_device_so(device=device)
    # timm has made cuda:LOCAL_RANK the current device under torchrun.
    return DistContext(rank=info["global_rank"], world_size=info["world_size"], local_rank=info["local_rank"],
                       device=torch.device(info["device"]))


def all_reduce_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Sum of each value over all ranks (identity for one process)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def _max_diff(ctx: DistContext, tensors: list[torch.Tensor]) -> float:
    worst = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for t in tensors:
        if not t.is_floating_point():
            continue
        ref = t.detach().clone()
        dist.broadcast(ref, 0)
        worst = torch.maximum(worst, (ref - t).abs().max().to(torch.float64))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


@torch.no_grad()
def rank_max_diff(ctx: DistContext, module: torch.nn.Module) -> tuple[float, float]:
    """Largest difference between this rank's tensors and rank 0's, maximised over ranks, for the
    parameters (0.0 when data-parallel training kept the replicas identical) and, separately, for the
    buffers: BatchNorm running statistics are per-rank by design, DDP does not synchronise them."""
    if not ctx.distributed:
        return 0.0, 0.0
    return (_max_diff(ctx, [p for p in module.parameters()]),
            _max_diff(ctx, [b for b in module.buffers()]))


def broadcast_object(ctx: DistContext, obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
